"""The dedicated evaluation engine (generator.eval_engine): held-out evaluation outside the
weight broadcast, so that no push ever waits for an evaluation.

With a generator evaluating (the default), an evaluation is of the one version its engine
holds, so a weight load waits for it and rank 0 holds back every push meanwhile: one
evaluation keeps the whole fleet on the evaluated weights (asyncrl/learner/lead.py push_due).
Here the evaluator is a process of its own with its own vLLM engine (`asyncrl evaluator`,
started by `asyncrl run`; on a GPU host it takes the GPUs after the generators'), and the
versions come to it as files, not through the broadcast:

  RUN_DIR/evals/step_<v>/      the version's weights in hub format, written by the learner
                               (`asyncrl.learner.checkpoint.export`, every rank under fsdp)
                               when version v is due an evaluation; version 0 is the model the
                               run started from and is not written
  RUN_DIR/evals/ask_<v>.json   the learner's request: {"version": v}, written by rank 0
                               after the weights (asyncrl/learner/evals.py FileEvaluators)
  RUN_DIR/evals/result_<v>.json  the answer: {"version", "accuracy", "problems", "seconds"},
                               which rank 0 joins into version v's metrics.jsonl row

Every file is written to a temporary name and renamed into place, so a reader never sees a
torn one. The evaluator takes the asks in version order, loads the version's weights into its
engine (`reload_weights` from the directory, as `benchmarks/async_vs_sync.py --posthoc` does)
and evaluates exactly as a generator does (`Evaluator.run_blocking`: the same held-out split,
prompts, greedy decoding and scoring), then removes the weights it no longer needs. A
restarted evaluator answers whatever asks are still unanswered. An ask it cannot read, or
whose weights it cannot load, is renamed to `ask_<v>.json.bad` and counted, never fatal; the
learner gives its evaluation up after weight_sync.timeout_s as it does a generator's.

Run (normally started by `asyncrl run`):
    python -m asyncrl evaluator --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("asyncrl.evaluator")

EVALS_DIR = "evals"


def weights_dir(evals: Path, version: int) -> Path:
    return evals / f"step_{version}"


def ask_path(evals: Path, version: int) -> Path:
    return evals / f"ask_{version}.json"


def result_path(evals: Path, version: int) -> Path:
    return evals / f"result_{version}.json"


def write_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_result(path: Path) -> dict | None:
    """A result file's fields, or None if it is not one (logged)."""
    try:
        r = json.loads(path.read_text())
        ok = (type(r) is dict and type(r.get("version")) is int
              and type(r.get("accuracy")) in (int, float) and 0 <= r["accuracy"] <= 1
              and type(r.get("seconds")) in (int, float) and type(r.get("problems")) is int)
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.error("%s is not an evaluation result; ignored", path)
        return None
    return r


def pending_asks(evals: Path, on_bad=lambda: None) -> list[int]:
    """The versions asked for and not answered yet, oldest first. An ask file that does not
    hold {"version": <its own number>} is set aside as .bad (and on_bad called)."""
    versions = []
    for p in evals.glob("ask_*.json"):
        stem = p.name.removeprefix("ask_").removesuffix(".json")
        try:
            ok = stem.isdigit() and json.loads(p.read_text()) == {"version": int(stem)}
        except (OSError, ValueError):
            ok = False
        if not ok:
            log.error("%s is not an evaluation request; set aside as %s.bad", p, p.name)
            os.replace(p, p.with_name(p.name + ".bad"))
            on_bad()
            continue
        if not result_path(evals, int(stem)).exists():
            versions.append(int(stem))
    return sorted(versions)


def run(cfg, model_dir: str, run_dir: Path) -> None:
    from asyncrl.generator.engine import configure_cpu_env, on_gpu

    gc = cfg.generator
    gpu = on_gpu()
    if not gpu:
        configure_cpu_env(gc.kv_cache_gib, gc.threads)
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    from asyncrl import metrics
    from asyncrl.generator.engine import VLLMEngine, engine_length
    from asyncrl.generator.evaluate import Evaluator
    from asyncrl.task import chat_context, encode_prompt, load_task

    registry = CollectorRegistry()
    m = metrics.EvaluatorMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.evaluator_metrics_port)
    evals = Path(run_dir) / EVALS_DIR
    evals.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    train, held_out = load_task(cfg.task)
    # The generators' engine length (training prompts too), so that the two evaluate alike.
    chat, context = cfg.task.chat_template, chat_context(cfg.task)
    length = engine_length(cfg, model_dir, [encode_prompt(tok, p.prompt, chat, context)
                                            for p in [*train, *held_out]])
    evaluator = Evaluator.for_task(cfg, tok, held_out, context_tokens=length)
    engine = VLLMEngine(model_dir, cfg.model.dtype, gc.seed, length,
                        gc.gpu_memory_utilization, gpu=gpu, cuda_graphs=gc.cuda_graphs,
                        tensor_parallel_size=gc.tensor_parallel_size)
    from asyncrl import transport, wire

    # Its liveness, as itself (the evaluator's own key): the buffer reports it when silent.
    transport.Heartbeat(cfg.net.buffer_host, cfg.net.heartbeat_port,
                        lambda: wire.encode("heartbeat", 0, sender="evaluator",
                                            role="evaluator"),
                        cfg.net.heartbeat_interval_s,
                        transport.keys_for(cfg.net, cfg.run_dir, "evaluator")).start()
    log.info("evaluator: engine up; evaluating the versions the learner writes to %s", evals)
    held = 0  # the version the engine holds: it starts from the run's model
    while True:
        held, answered = answer_pending(evals, Path(model_dir), engine, evaluator, m, held)
        if not answered:
            time.sleep(0.2)


def answer_pending(evals: Path, model_dir: Path, engine, evaluator, m, held: int
                   ) -> tuple[int, int]:
    """Answer every request waiting, oldest first: load its version (unless the engine holds
    it), evaluate, write the result, drop the weights. Returns the version the engine holds
    after (-1: none whole) and how many were answered."""
    answered = 0
    asks = pending_asks(evals, m.bad_asks.inc)
    m.backlog.set(len(asks))
    for version in asks:
        if version != held:
            source = weights_dir(evals, version) if version else model_dir
            try:
                m.load_seconds.observe(engine.load_dir(str(source)))
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                # Weights missing or not this model's: this request cannot be answered, the
                # next may be (the learner gives this one up after weight_sync.timeout_s).
                log.error("evaluator: cannot load version %d from %s (%s); its request is set "
                          "aside", version, source, e)
                path = ask_path(evals, version)
                os.replace(path, path.with_name(path.name + ".bad"))
                m.bad_asks.inc()
                held = -1  # a load that failed halfway leaves no version whole
                continue
            held = version
        evaluator.ask(version)
        r = evaluator.run_blocking(engine, version)
        write_atomic(result_path(evals, version), {
            "version": version, "accuracy": r.accuracy, "problems": r.problems,
            "seconds": r.seconds})
        answered += 1
        m.evaluations.inc()
        m.eval_seconds.observe(r.seconds)
        m.accuracy.set(r.accuracy)
        m.policy_version.set(version)
        m.backlog.set(len(asks) - answered)
        log.info("evaluator: version %d held-out accuracy %.3f (%d problems, %.1fs)",
                 version, r.accuracy, r.problems, r.seconds)
        if version:
            shutil.rmtree(weights_dir(evals, version), ignore_errors=True)
    return held, answered

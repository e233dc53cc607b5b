"""model.lora through the whole loop (real vLLM, real sockets, real torchrun): the learner trains
adapters only and each push carries the adapter alone; in keep mode the pushes land while
sequences run and every trained completion keeps the version of the adapter it started on, its
behaviour logprobs equal to the learner's under that version's adapter within 1e-4 (the base
for version 0); the memory-backed adapter files are gone after the run. The same for the real
SmolLM2-135M-Instruct. Slow-marked (CI runs them in its second pytest call): the default suite
keeps tests/e2e/test_lora_engine.py, the same engine checks without the loop."""

import json

import pytest
import torch

from asyncrl import lora
from asyncrl.learner.model import load_policy, token_logprobs
from asyncrl.learner.runlog import read_batch_log
from tests.conftest import asyncrl, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOL = 1e-4
STEPS = 12
TEMPERATURE = 2.0


def _policy(base_dir, run_dir, version, cache):
    """The learner's policy of `version`: the base, with the adapter of checkpoint step_v."""
    if version not in cache:
        model, _ = load_policy(base_dir)
        if version:
            cfg = json.loads((run_dir / "checkpoints" / f"step_{version}" /
                              lora.ADAPTER_CONFIG).read_text())
            lora.apply(model, cfg["r"], cfg["lora_alpha"], 0.0, cfg["target_modules"])
            lora.load_adapter(model, run_dir / "checkpoints" / f"step_{version}")
        cache[version] = model.eval()
    return cache[version]


def _check_versions_and_logprobs(run_dir, base_dir, temperature, limit=24):
    """Every trained completion has one version; (max |behaviour - learner| over the
    completions checked, versions seen)."""
    worst, seen, cache, checked = 0.0, set(), {}, 0
    for groups in read_batch_log(run_dir / "batches" / "rank0.bin"):
        for g in groups:
            for c in g.completions:
                versions = set(c.versions.tolist())
                assert len(versions) == 1, versions  # a request stays on its adapter
                (v,) = versions
                seen.add(v)
                if checked >= limit or not (v == 0 or (run_dir / "checkpoints" /
                                                       f"step_{v}").is_dir()):
                    continue
                checked += 1
                ids = torch.tensor([g.prompt_tokens.tolist() + c.tokens.tolist()])
                with torch.no_grad():
                    lp = token_logprobs(_policy(base_dir, run_dir, v, cache), ids,
                                        torch.ones_like(ids), temperature)[0]
                lp = lp[len(g.prompt_tokens) - 1:]
                worst = max(worst, (lp - torch.tensor(c.logprobs.tolist())).abs().max().item())
    assert checked
    return worst, seen


@pytest.fixture(scope="module")
def tiny_run(model_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora-run")
    r = asyncrl("run", "configs/default.yaml", f"warm_start.cache_dir={model_cache}",
                f"run_dir={run_dir}", f"net.base_port={free_base_port()}",
                "model.lora.rank=8", "learner.lr=1e-3",
                f"learner.total_steps={STEPS}", "learner.eval_interval=100",
                "learner.checkpoint_interval=1", "generator.streaming=true",
                "generator.inflight_update=keep", "generator.max_tokens=24",
                f"generator.temperature={TEMPERATURE}", "buffer.max_staleness=4",
                "generator.max_inflight=8", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    from asyncrl.config import load_config

    return run_dir, load_config(run_dir / "config.yaml").model.path, r.stdout


def test_lora_trains_the_adapters_and_keeps_every_tokens_version(tiny_run):
    run_dir, base_dir, _ = tiny_run
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    stats = json.loads((run_dir / "gen0_stats.json").read_text())
    assert stats["inflight_updates"] > 0  # pushes landed while sequences ran
    worst, seen = _check_versions_and_logprobs(run_dir, base_dir, TEMPERATURE)
    assert len(seen) > 2 and max(seen) >= 1
    print(f"\nLoRA keep mode: versions {sorted(seen)}, behaviour vs learner max |diff| "
          f"{worst:.2e}")
    assert worst < TOL
    # Checkpoints and the export are peft-format adapters, a few hundred KB.
    final = run_dir / "export" / "final"
    assert (final / lora.ADAPTER_CONFIG).is_file() and not (final / "config.json").exists()
    assert (final / lora.ADAPTER_WEIGHTS).stat().st_size < 2 << 20


def test_pushes_carry_the_adapter_alone_and_its_files_are_removed(tiny_run):
    from pathlib import Path

    from safetensors import safe_open

    run_dir, base_dir, _ = tiny_run
    with safe_open(str(run_dir / "export" / "final" / lora.ADAPTER_WEIGHTS), "pt") as f:
        adapter = sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # noqa: SIM118
    model = sum(p.stat().st_size for p in Path(base_dir).glob("*.safetensors"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pushes = [r["sync_bytes"] for r in rows[1:] if r.get("sync_bytes") is not None]
    assert pushes and set(pushes) == {adapter}  # every push: the adapter's float32 bytes
    assert adapter * 5 < model
    # The generator wrote each pushed version under /dev/shm and removed them all at exit.
    assert not list(Path("/dev/shm").glob("asyncrl-*/gen0-*/v*")) or all(
        p.stat().st_mtime < (run_dir / "config.yaml").stat().st_mtime
        for p in Path("/dev/shm").glob("asyncrl-*/gen0-*/v*"))


def test_smollm2_with_lora_runs_through_the_loop(smollm2_cache, tmp_path):
    from asyncrl.task import smollm2

    r = asyncrl("run", "configs/smollm2.yaml", f"run_dir={tmp_path}",
                f"warm_start.cache_dir={smollm2_cache}", f"net.base_port={free_base_port()}",
                "model.lora.rank=16", "learner.total_steps=3", "learner.groups_per_step=2",
                "learner.minibatches=1", "generator.group_size=4",
                "generator.prompts_per_call=2", "generator.max_tokens=48", "task.eval_size=4",
                "learner.eval_interval=100", "learner.lr=1e-4", "learner.warmup_steps=0",
                "learner.checkpoint_interval=1", "buffer.max_staleness=0", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from asyncrl.config import load_config

    temperature = load_config(tmp_path / "config.yaml").generator.temperature
    worst, seen = _check_versions_and_logprobs(tmp_path, smollm2.built_dir(smollm2_cache),
                                               temperature, limit=8)
    print(f"\nSmolLM2 + LoRA: versions {sorted(seen)}, behaviour vs learner max |diff| "
          f"{worst:.2e}")
    assert max(seen) >= 1 and worst < TOL

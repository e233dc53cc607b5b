"""The vLLM engine wrapper: the only generator code that imports vllm.

The rest of the generator sees `generate(prompts) -> samples` and the two sync calls, so a
fake with the same interface can drive the pipeline logic in fast tests; the end-to-end tests
always use this real engine.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from asyncrl.lora import config_from_wire
from asyncrl.wire import DEFAULT_BUCKET_BYTES


@dataclass
class Sample:
    tokens: list[int]
    logprobs: list[float]  # behaviour logprob of each sampled token (temperature applied)
    finish_reason: str


def on_gpu() -> bool:
    """Whether this generator's engine runs on a GPU (CUDA_VISIBLE_DEVICES is already set)."""
    import torch

    return torch.cuda.is_available()


def configure_cpu_env(kv_cache_gib: int, threads: int) -> None:
    """vLLM reads these at import; set them before `import vllm`. CPU only: on a GPU the engine
    keeps vLLM's defaults (its own process, its own threads).

    VLLM_CPU_KVCACHE_SPACE is required on CPU (vLLM otherwise sizes the KV cache from a whole
    NUMA node and fails). The in-process engine starts in ~3 s instead of ~25 s and lets the
    worker extension run in this process.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind" if threads else "auto")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # torch is already imported (on_gpu), so OpenMP has read its thread count: the variable
    # alone came too late, and vLLM's CPU attention ran as many OpenMP threads as there are
    # cores. Two OpenMP threads on a machine whose other core trains spin at every barrier
    # whenever one of them is descheduled: measured 5-10x slower generation under load.
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class VLLMEngine:
    def __init__(self, model_dir: str, dtype: str, seed: int, max_model_len: int,
                 gpu_memory_utilization: float, gpu: bool = False, cuda_graphs: bool = True,
                 tensor_parallel_size: int = 1, prefix_caching: bool = False,
                 block_size: int = 0, lora_rank: int = 0, max_loras: int = 1,
                 adapter_dir: str | Path | None = None):
        """prefix_caching: reuse the KV of prompt prefixes (multi-turn episodes resubmit their
        transcript every turn); requests are then salted with the policy version (Rollout).
        block_size: KV cache block size in tokens (0: vLLM's; only full blocks are reused).
        lora_rank > 0 (model.lora): the engine serves the base model plus one LoRA adapter per
        pushed version (Adapters), up to max_loras of them in one batch; adapter_dir is
        where pushed adapters are written (memory-backed files)."""
        from vllm import LLM

        self.prefix_caching = prefix_caching
        lora = ({"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": max_loras,
                 "max_cpu_loras": max_loras} if lora_rank else {})
        self.llm = LLM(
            model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
            # CUDA graphs on a GPU: reload_weights copies into the parameters in place, so the
            # captured graphs stay valid. The CPU backend has none to capture.
            enforce_eager=not (gpu and cuda_graphs),
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            # Logprobs after temperature: the distribution tokens were actually sampled from.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="asyncrl.sync.receiver.WeightReceiver",
            generation_config="vllm",  # ignore the checkpoint's sampling defaults
            enable_prefix_caching=prefix_caching,
            **({"block_size": block_size} if block_size else {}),
            **lora,
        )
        self.adapters = (Adapters(self.llm.llm_engine, adapter_dir or adapter_root("engine"))
                         if lora_rank else None)
        self._live: set[str] = set()  # request-level requests not finished or aborted
        self._counted: set[str] = set()  # live requests whose cached prompt tokens were reported
        self._stash: list[Delta] = []  # their outputs taken while `generate` ran
        self._calls = 0

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Sample]]:
        """n samples of each prompt, blocking until all are done. While streaming requests run
        (the sync probe after an in-flight update), through the request-level loop, keeping
        what the other requests produce meanwhile for the next `step`."""
        if self._live:
            return self._generate_among_others(prompts, n, temperature, max_tokens, seed)
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                seed=seed, detokenize=False)
        lora = self.adapters.request(None) if self.adapters else None
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False, lora_request=lora)
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
                group.append(Sample(list(c.token_ids), lps, c.finish_reason or "length"))
            result.append(group)
        return result

    # ---------------------------------------------------------- request-level (streaming)
    # The engine's own loop, one request per completion: add requests whenever there is room,
    # step, collect what each step produced, abort. vLLM's LLMEngine (in-process on CPU; the
    # same calls drive the multiprocess engine core on GPU).

    def _generate_among_others(self, prompts, n, temperature, max_tokens, seed):
        mine = {f"asyncrl-generate-{self._calls}-{i}-{k}": (i, k)
                for i in range(len(prompts)) for k in range(n)}
        self._calls += 1
        for rid, (i, k) in mine.items():
            self.add(rid, prompts[i], temperature, max_tokens,
                     None if seed is None else seed + k)
        got = {rid: Sample([], [], "") for rid in mine}
        while any(not s.finish_reason for s in got.values()):
            for d in self._engine_step():
                if d.request_id not in mine:
                    self._stash.append(d)
                    continue
                s = got[d.request_id]
                s.tokens += d.tokens
                s.logprobs += d.logprobs
                s.finish_reason = d.finish_reason
        out = [[None] * n for _ in prompts]
        for rid, (i, k) in mine.items():
            out[i][k] = got[rid]
        return out

    def add(self, request_id: str, prompt: list[int], temperature: float, max_tokens: int,
            seed: int | None = None, cache_salt: str | None = None,
            version: int | None = None) -> None:
        """A request of the engine's own loop. cache_salt: prefix-cache blocks are shared only
        between requests of the same salt (the policy version that computes them). version
        (model.lora): the adapter the request runs on from start to end (None: the newest)."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                seed=seed, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        tokens = (TokensPrompt(prompt_token_ids=prompt) if cache_salt is None
                  else TokensPrompt(prompt_token_ids=prompt, cache_salt=cache_salt))
        lora = self.adapters.request(version, request_id) if self.adapters else None
        self.llm.llm_engine.add_request(request_id, tokens, params, lora_request=lora)
        self._live.add(request_id)

    def step(self) -> list[Delta]:
        """What the requests produced since the last step (kept outputs first)."""
        out, self._stash = self._stash, []
        return out + self._engine_step()

    def _engine_step(self) -> list[Delta]:
        out = []
        for o in self.llm.llm_engine.step():
            c = o.outputs[0]
            lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs or [])]
            cached = 0
            if o.request_id not in self._counted and o.num_cached_tokens is not None:
                self._counted.add(o.request_id)
                cached = o.num_cached_tokens
            out.append(Delta(o.request_id, list(c.token_ids), lps, o.finished,
                             (c.finish_reason or "length") if o.finished else "", cached))
            if o.finished:
                self._live.discard(o.request_id)
                self._counted.discard(o.request_id)
                if self.adapters:
                    self.adapters.finished([o.request_id])
        return out

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.llm.llm_engine.abort_request(request_ids)
            self._live.difference_update(request_ids)
            self._counted.difference_update(request_ids)
            self._stash = [d for d in self._stash if d.request_id not in set(request_ids)]
            if self.adapters:
                self.adapters.finished(request_ids)

    def has_unfinished(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def init_sync(self, host: str, port: int, rank: int, world_size: int, backend: str,
                  timeout_s: float, prefix: str) -> None:
        self.llm.collective_rpc("asyncrl_init_sync",
                                args=(host, port, rank, world_size, backend, timeout_s, prefix))

    def leave_sync(self) -> None:
        self.llm.collective_rpc("asyncrl_leave_sync")

    def receive_weights(self, specs: list[list], ipc: list[dict] | None = None,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, adapter: dict | None = None,
                        version: int | None = None) -> tuple[float, int]:
        """Load one push: from the sync group's broadcasts, bucket by bucket, or (colocated)
        from the learner's buffers through their CUDA IPC handles. With `adapter` (model.lora)
        the push is that version's LoRA adapter: written to memory-backed files and added as
        an adapter of its own; running requests stay on theirs."""
        if adapter:
            t0 = time.perf_counter()
            path = self.adapters.path(version)
            _, nbytes = self.llm.collective_rpc(
                "asyncrl_receive_adapter",
                args=(specs, bucket_bytes, str(path), config_from_wire(adapter)))[0]
            self.adapters.add(version, path)
            return time.perf_counter() - t0, nbytes
        seconds, nbytes = self.llm.collective_rpc("asyncrl_receive_weights",
                                                  args=(specs, ipc or None, bucket_bytes))[0]
        if not self._live:  # with requests running their blocks are in use (and the cache off)
            self.llm.reset_prefix_cache()
        return seconds, nbytes

    def load_dir(self, path: str) -> float:
        """Load the hub-format weights in a directory (the evaluator); returns seconds."""
        seconds = self.llm.collective_rpc("asyncrl_load_dir", args=(path,))[0]
        if not self._live:
            self.llm.reset_prefix_cache()
        return seconds


def adapter_root(name: str) -> Path:
    """Where a generator process writes its pushed adapters: memory-backed files (/dev/shm,
    else the temp directory), under a directory of this user's only, one per process
    (`<name>-<pid>`); those of earlier processes of the same name that are gone (a killed
    generator's) are removed by its successor."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    mine = base / f"asyncrl-{os.getuid()}"  # this user's, not readable by others
    mine.mkdir(mode=0o700, exist_ok=True)
    root = mine / f"{name}-{os.getpid()}"
    for old in root.parent.glob(f"{name}-*"):  # those of processes no longer running
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


class Adapters:
    """model.lora in the engine: each pushed version is its own LoRA adapter (its own name,
    id and directory: vLLM's prefix cache keys include the adapter, so a version re-using a
    name would be served another version's KV). A request runs on the adapter of the version
    it started under (version 0, before any push, is the base: no adapter); an adapter that
    is neither the newest nor in use by a running request is removed with its files."""

    def __init__(self, engine, root: Path):
        import atexit
        import shutil

        self.engine, self.root = engine, Path(root)
        self.loaded: dict[int, object] = {}  # version -> LoRARequest
        self.newest = 0
        self.running: dict[str, int] = {}  # request id -> the version it runs on
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def add(self, version: int, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        if version in self.loaded:  # the same version pushed again (a re-formed session)
            self.engine.remove_lora(version)
        # lora_int_id must be > 0: versions from 1 (version 0 is the base)
        req = LoRARequest(f"asyncrl-v{version}", version, str(path))
        self.engine.add_lora(req)
        self.loaded[version] = req
        self.newest = max(self.newest, version)
        self.release()

    def request(self, version: int | None, request_id: str | None = None):
        """The LoRARequest of `version` (None: the newest), or None for the base."""
        v = self.newest if version is None else version
        if v and v not in self.loaded:
            raise RuntimeError(f"no adapter of policy version {v} is loaded (have "
                               f"{sorted(self.loaded)})")
        if request_id is not None:
            self.running[request_id] = v
        return self.loaded.get(v)

    def finished(self, request_ids) -> None:
        for rid in request_ids:
            self.running.pop(rid, None)
        self.release()

    def release(self) -> None:
        import shutil

        used = {*self.running.values(), self.newest}
        for v in [v for v in self.loaded if v not in used]:
            self.engine.remove_lora(v)
            del self.loaded[v]
            shutil.rmtree(self.path(v), ignore_errors=True)


@dataclass
class Delta:
    """What one engine step added to one running request."""

    request_id: str
    tokens: list[int]
    logprobs: list[float]  # behaviour logprob of each new token (temperature applied)
    finished: bool
    finish_reason: str  # "stop" | "length" | "abort" once finished, else ""
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (a request's first output)


def engine_length(cfg, model_dir: str, prompts: list[list[int]]) -> int:
    """The engine's max_model_len: the longest prompt and completion with 8 spare; with an
    environment, whose prompts only its reset says, the model's positions (each episode
    keeps within them)."""
    if cfg.env.name or cfg.endpoint_on:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return int(config.get("max_position_embeddings", 4096))
    return max(map(len, prompts)) + cfg.max_completion_tokens + 8

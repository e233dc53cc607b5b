"""Which GPU each role gets on one host, decided once by `asyncrl run` before any role starts.

Never shared by accident: NCCL cannot broadcast between two ranks on one GPU, and two vLLM
engines on one GPU run out of memory. With `weight_sync.backend=auto` and no device lists, the
visible GPUs are split: generators first (generator i gets GPU i), then the learner ranks. A host
with one GPU and one generator and one learner rank runs colocated: both on GPU 0, weights handed
over by CUDA IPC (`weight_sync.backend=ipc`), memory shared through
generator.gpu_memory_utilization.
The reward service (reward.service) takes the first GPU left after them.
With no GPU (this project's CI) nothing changes and the backend is gloo. Lists given in the
config are kept; config validation has already refused lists that overlap under NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncrl.config import ConfigError, RunConfig, validate


@dataclass(frozen=True)
class Assignment:
    generator_ids: list[int]
    learner_ids: list[int]
    backend: str  # gloo | nccl | ipc

    def describe(self) -> str:
        if not self.generator_ids and not self.learner_ids:
            return f"devices: CPU only (sync over {self.backend})"
        gens = ", ".join(f"gen{i}: GPU {d}" for i, d in enumerate(self.generator_ids))
        ranks = ", ".join(f"rank {r}: GPU {d}" for r, d in enumerate(self.learner_ids))
        return (f"devices: {gens or 'generators: visible GPUs'}; "
                f"{ranks or 'learner: visible GPUs'} (sync over {self.backend})")


def assign(num_generators: int, nproc: int, gen_ids: list[int], learner_ids: list[int],
           backend: str, visible: int) -> Assignment:
    """The devices of one host's roles; `visible` GPUs are visible to the launcher."""
    if visible == 0 or backend == "gloo":
        return Assignment(list(gen_ids), list(learner_ids),
                          "gloo" if backend in ("auto", "gloo") else backend)
    if gen_ids and learner_ids:
        return Assignment(list(gen_ids), list(learner_ids), _backend(backend, gen_ids,
                                                                      learner_ids))
    if backend == "ipc" or (backend == "auto" and visible == 1 and num_generators == 1
                            and nproc == 1 and not gen_ids and not learner_ids):
        dev = (gen_ids or learner_ids or [0])[0]
        return Assignment([dev], [dev], "ipc")
    taken = set(gen_ids) | set(learner_ids)
    free = [d for d in range(visible) if d not in taken]
    need = (0 if gen_ids else num_generators) + (0 if learner_ids else nproc)
    if need > len(free):
        raise ConfigError(
            f"{visible} GPU(s) visible, but generator.num_generators={num_generators} and "
            f"learner.nproc={nproc} need {num_generators + nproc} of their own under NCCL. Use "
            "fewer, set generator.device_ids and learner.device_ids, or on one GPU run one "
            "generator and one rank colocated (weight_sync.backend=ipc); generator.eval_engine's "
            "evaluator counts as one generator more")
    gens = list(gen_ids) or free[:num_generators]
    rest = [d for d in free if d not in gens]
    ranks = list(learner_ids) or rest[:nproc]
    return Assignment(gens, ranks, _backend(backend, gens, ranks))


def _backend(backend: str, gens: list[int], ranks: list[int]) -> str:
    if backend != "auto":
        return backend
    return "ipc" if set(gens) & set(ranks) else "nccl"


def apply(cfg: RunConfig, visible: int) -> Assignment:
    """Assign and write the result into cfg (saved as RUN_DIR/config.yaml, which every role
    reads): generator.device_ids, learner.device_ids, weight_sync.backend. With tensor parallelism a
    generator takes tensor_parallel_size consecutive GPUs (as many "generators" to assign);
    the evaluator (generator.eval_engine) takes the ones after the generators'."""
    tp = cfg.generator.tensor_parallel_size
    a = assign(cfg.generator.engines * tp, cfg.learner.nproc, cfg.generator.device_ids,
               cfg.learner.device_ids, cfg.weight_sync.backend, visible)
    cfg.generator.device_ids, cfg.learner.device_ids = a.generator_ids, a.learner_ids
    cfg.weight_sync.backend = a.backend
    if cfg.reward.service and visible and not cfg.reward.device_ids:
        cfg.reward.device_ids = [reward_device(a, visible)]
    validate(cfg)  # the assignment obeys the same rules as a hand-written config
    return a


def reward_device(a: Assignment, visible: int) -> int:
    """The reward role's GPU (reward.service): the first one no generator or rank holds."""
    free = [d for d in range(visible) if d not in {*a.generator_ids, *a.learner_ids}]
    if not free:
        raise ConfigError(
            f"{visible} GPU(s) visible and all taken by the generators and learner ranks; the "
            "reward service (reward.service) needs one of its own: use fewer generators, or "
            "set reward.device_ids (it may share a generator's GPU if memory allows: lower "
            "generator.gpu_memory_utilization)")
    return free[0]


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0

"""Which settings shape what a run trains: the ones a resumed run must keep (all but
RESUME_FREE, asyncrl/runner.py refuses others), and the ones the builtin reward model's rounds
of iterated preferences depend on (their RL runs are this config's; asyncrl/rm/builtin.py)."""

from __future__ import annotations

from asyncrl.config.schema import RunConfig

# Settings a resumed run may change: where and how the roles run, not what is trained
# (model.path is compared as built, so warm_start.* enters through it). The learner's and the
# generator's threads are here too: another machine may have other cores, at the price of a
# replay that is exact only with the threads that trained it (docs/reliability.md).
RESUME_FREE = ("name", "run_dir", "net.", "run.", "warm_start.", "buffer.fsync",
               "generator.kv_cache_gib", "generator.gpu_memory_utilization",
               "generator.cuda_graphs", "generator.device_ids", "generator.threads",
               "learner.max_restarts", "learner.device_ids", "learner.threads",
               "learner.collective_timeout_s", "learner.rdzv_endpoint",
               "learner.checkpoint_interval", "learner.export_interval", "weight_sync.timeout_s",
               "weight_sync.probe_prompt")


def flat_settings(c: RunConfig) -> dict:
    """Every setting by its dotted key."""
    from omegaconf import OmegaConf

    out: dict = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(OmegaConf.to_container(OmegaConf.structured(c)), "")
    return out


def training_fields(cfg: RunConfig) -> dict:
    """The settings that shape what a run trains, but its model, reward model and rm.*: what
    the RL runs of iterated preferences (rm.rounds) depend on, for their cache key."""
    return {k: v for k, v in flat_settings(cfg).items()
            if not k.startswith((*RESUME_FREE, "rm.", "model.path", "task.reward_model"))}

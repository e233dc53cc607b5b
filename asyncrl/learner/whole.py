"""What needs the whole model in the learner: weight pushes, checkpoints, hub-format exports and
the final checksum. With learner.strategy=ddp rank 0 holds the whole model and does these alone;
with fsdp every rank takes part, gathering its shards (asyncrl/learner/shard.py), and rank 0
keeps the results."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from asyncrl import lora
from asyncrl.config import RunConfig
from asyncrl.learner import checkpoint, shard
from asyncrl.learner.lead import Lead
from asyncrl.learner.runlog import named_sha256, weights_sha256
from asyncrl.learner.step import Models
from asyncrl.sync import weights

log = logging.getLogger("asyncrl.learner")


class Whole:
    """What needs the whole model: weight pushes, checkpoints, the checksum. With
    learner.strategy=ddp rank 0 holds it and does these alone (the others skip them); with
    fsdp every rank takes part, gathering its shards, and rank 0 keeps the results."""

    def __init__(self, cfg: RunConfig, run_dir: Path, models: Models, tok, lead: Lead | None,
                 rank: int, device: torch.device):
        self.cfg, self.run_dir, self.models, self.tok, self.lead = cfg, run_dir, models, tok, lead
        self.rank, self.device = rank, device
        self.every_rank = shard.is_sharded(models.policy)
        self._last_keep = 0.0

    def keep_in_sync(self, version: int) -> None:
        """While waiting for data: a generator that restarted (a new incarnation, at version
        0) samples data too stale to be trained on, so waiting for that data to step and push
        would wait forever. Rank 0 looks at most once a second whether the session must
        re-form or a generator is behind, and pushes `version` (the weights as they are) if
        so; under fsdp the other ranks follow its answer and gather with it."""
        if not self.every_rank and self.lead is None:
            return
        now = time.monotonic()
        look = self.lead is not None and now - self._last_keep >= 1.0
        if look:
            self._last_keep = now
        pushed = self.push(version, due=False, look=look)
        if pushed is not None:
            self.lead.m.sync_seconds.observe(pushed[0])
            self.lead.m.sync_bytes.inc(pushed[1])
            log.info("pushed version %d to a generator that was behind while waiting for data",
                     version)

    def push(self, version: int, due: bool, look: bool = True) -> tuple[float, int] | None:
        """Push `version` if rank 0's sender says so (`due`: weight_sync.interval says it is time;
        `look=False`: rank 0 does not even ask). Under fsdp a collective of every rank: rank
        0 decides and every rank gathers. A failed push is retried once, the session
        re-formed with the generators heard from since. Returns (seconds, bytes) or None."""
        lead = self.lead
        if lead is None and not self.every_rank:
            return None  # ddp: rank 0 alone holds what is pushed
        due = lead.push_due(due) if lead is not None else False
        for attempt in (1, 2):
            wanted = lead is not None and look and lead.sender.due(version, due)
            if self.every_rank:
                wanted = shard.from_rank0(wanted, self.device)
            if not wanted:
                return None
            tensors = self._pushed()
            pushed = None
            try:
                pushed = self._send(version, tensors)
            except (RuntimeError, TimeoutError) as e:
                if attempt == 2:
                    if self.every_rank:
                        shard.from_rank0(False, self.device)
                    raise
                log.warning("weight sync to version %d failed (%s); re-forming the session "
                            "with the generators heard from after the failure", version, e)
            ok = shard.from_rank0(pushed is not None, self.device) if self.every_rank \
                else pushed is not None
            if ok:
                if due and lead is not None:
                    lead.push_owed = False
                return pushed
        return None

    def _pushed(self):
        """What a push sends, one tensor at a time: the whole model, or its LoRA adapters
        (peft's names). Under fsdp each is gathered as it is reached (every rank)."""
        policy = shard.unwrap(self.models.policy)
        if not self.every_rank:
            return weights.sendable(policy)
        if not lora.is_adapted(policy):
            return shard.full_tensors(self.models.policy)
        return lora.adapter_tensors(shard.full_tensors(self.models.policy,
                                                       only=lora.is_adapter_tensor))

    def _send(self, version: int, tensors) -> tuple[float, int] | None:
        """Rank 0 pushes; the other ranks (fsdp) only take part in the gathers."""
        if self.lead is None:
            for _ in tensors:
                pass
            return None
        sender = self.lead.sender
        specs = weights.specs_of(weights.sendable(shard.unwrap(self.models.policy)),
                                 sender.dtype)
        return sender.push(version, specs, tensors)

    def export_for_eval(self, version: int) -> None:
        """generator.eval_engine: the weights of `version` in hub format for the evaluator
        (RUN_DIR/evals/step_<version>/, asyncrl/generator/eval_engine.py). Every rank under
        fsdp (a gather), rank 0 alone otherwise."""
        from asyncrl.generator.eval_engine import EVALS_DIR, weights_dir

        if not self.every_rank and self.lead is None:
            return
        t0 = time.perf_counter()
        checkpoint.export(weights_dir(self.run_dir / EVALS_DIR, version), self.models.policy,
                          self.tok, self.rank, merged=True)
        if self.lead is not None:
            self.lead.evaluators.exported = version
            log.info("wrote version %d for the evaluator (%.2fs)", version,
                     time.perf_counter() - t0)

    def finish_evals(self, version: int) -> None:
        """End of training: rank 0 waits (up to weight_sync.timeout_s) for the evaluations still
        outstanding (RemoteEvals.finish), pushing the final version if it was held back; under
        fsdp the other ranks follow each round so that they gather with it for a push."""
        if not self.every_rank:
            if self.lead is not None:
                self.lead.evals.finish(version, lambda: self.keep_in_sync(version),
                                       self.cfg.weight_sync.timeout_s)
            return
        if self.lead is not None:
            def one_round() -> None:
                shard.from_rank0(True, self.device)  # the others: one more round
                self.keep_in_sync(version)

            self.lead.evals.finish(version, one_round, self.cfg.weight_sync.timeout_s)
            shard.from_rank0(False, self.device)
        else:
            while shard.from_rank0(False, self.device):
                self.keep_in_sync(version)

    def save_checkpoint(self, step: int, sched) -> None:
        if self.cfg.learner.strategy == "fsdp":
            state = self.lead.counters(step) if self.lead is not None else {}
            checkpoint.save_sharded(self.run_dir, step, self.models, sched, state, self.rank)
        elif self.lead is not None:
            checkpoint.save(self.run_dir, step, shard.unwrap(self.models.policy), self.tok,
                            self.models, sched, self.lead.counters(step))

    def checksum(self) -> str | None:
        if self.every_rank:
            return named_sha256(shard.full_tensors(self.models.policy))
        return weights_sha256(shard.unwrap(self.models.policy)) if self.lead else None

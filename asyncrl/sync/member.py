"""The generator side of weight sync: say hello, join sessions, load pushed weights.

The learner decides when a session forms (asyncrl/sync/sender.py); a generator only follows:
it says hello (name, incarnation, the session it is in, the version it holds) when it starts
and then at most every `hello_interval_s`, joins whatever session it is told to join, and loads
each push of that session. A failed join or receive (the learner died, or dropped the group
mid-broadcast) is not fatal: the generator reports that it is in no session, keeps its version
number, and goes on generating until the learner forms a new one and pushes again (it is
behind, so it is pushed to as soon as the session forms). A push streams in buckets
(asyncrl/sync/weights.py), so one that fails halfway leaves the engine with the buckets loaded
until then: its behaviour logprobs are still those of the weights it samples with, which is
what the learner's off-policy correction needs, but they are labelled with the old version
until the next push lands.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from asyncrl import wire

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)


class LearnerFinished(Exception):
    """The learner said training is over (a `shutdown` message)."""


class InFlight(Protocol):
    """What runs in the engine while weights load (asyncrl/generator/stream.py's Rollout)."""

    def before_update(self, version: int) -> None: ...

    def after_update(self, version: int | None = None) -> None: ...


@dataclass
class Loaded:
    version: int
    seconds: float
    nbytes: int


@dataclass
class Served:
    """What one `serve` call did: the versions the learner asked to have evaluated (the
    generator evaluates the version it holds and answers with report_eval), and the loads."""

    asked: list[int] = field(default_factory=list)
    loaded: list[Loaded] = field(default_factory=list)


class SyncMember:
    def __init__(self, control, engine, name: str, sync_rank: int, incarnation: str,
                 host: str, store_port: int, backend: str, timeout_s: float,
                 hello_interval_s: float, alone_timeout_s: float,
                 max_weight_bytes: int = wire.MAX_WEIGHT_BYTES, rejected: Counter | None = None,
                 lora_rank: int = 0):
        """control: a transport.Client to learner rank 0's sync control port. engine: has
        init_sync / leave_sync / receive_weights (asyncrl.generator.engine.VLLMEngine).
        alone_timeout_s: fail when no session has been joined for this long (the learner is
        gone). max_weight_bytes: a push announcing more is refused before anything is
        allocated (asyncrl.sync.weights.push_bytes_bound). rejected: counts refused control
        frames by reason (GeneratorMetrics.messages_rejected). lora_rank: model.lora.rank, the
        largest adapter the engine loads (0: it loads whole weights, never adapters)."""
        self.control, self.engine = control, engine
        self.name, self.sync_rank, self.incarnation = name, sync_rank, incarnation
        self.host, self.store_port, self.backend, self.timeout_s = (host, store_port, backend,
                                                                   timeout_s)
        self.hello_interval_s = hello_interval_s
        self.alone_timeout_s = alone_timeout_s
        self.max_weight_bytes, self.rejected = max_weight_bytes, rejected
        self.lora_rank = lora_rank
        self.alone_since = time.monotonic()
        self.session = ""
        self.version = 0
        self._last_hello = float("-inf")

    def hello(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_hello >= self.hello_interval_s:
            self._last_hello = now
            self.control.try_send(wire.encode(
                "generator_hello", self.version, sender=self.name, sync_rank=self.sync_rank,
                incarnation=self.incarnation, session=self.session))

    def serve(self, timeout_s: float, inflight: InFlight | None = None) -> Served:
        """Say hello if due, then handle every control message waiting (or arriving within
        timeout_s): join a session, load a push (`inflight`, what runs in the engine, is told
        before and after: between two engine steps), note an evaluation asked for. Raises
        TimeoutError after alone_timeout_s without a session, LearnerFinished on shutdown."""
        self.hello()
        if not self.session and time.monotonic() - self.alone_since > self.alone_timeout_s:
            raise TimeoutError(
                f"{self.name}: no weight-sync session from the learner at "
                f"{self.control.addr} for {self.alone_timeout_s:.0f}s (net.learner_host; the "
                "limit is net.ready_timeout_s)")
        served = Served()
        while (frame := self.control.poll(timeout_s)) is not None:
            timeout_s = 0.0
            try:
                msg = wire.decode(frame, expect=("sync_join", "weights_update", "shutdown",
                                                 "eval_request"))
            except wire.MessageError as e:
                self._reject(e.reason, f"bad control frame from the learner ({e}); ignored")
                continue
            if msg.kind == "shutdown":
                raise LearnerFinished(msg.reason)
            if msg.kind == "eval_request":
                served.asked.append(msg.policy_version)
            elif msg.kind == "sync_join":
                self._join(msg.session, msg.world_size, msg.token)
            elif msg.session != self.session:
                log.warning("%s: ignored a weight update for session %s (we are in %r)",
                            self.name, msg.session, self.session)
            elif (loaded := self._receive(msg, inflight)) is not None:
                served.loaded.append(loaded)
        return served

    def report_eval(self, asked: int, version: int, accuracy: float, problems: int,
                    seconds: float) -> None:
        """Answer an eval_request: the accuracy of `version`, the one the engine held."""
        self.control.try_send(wire.encode("eval_result", version, sender=self.name,
                                          asked=asked, accuracy=accuracy, problems=problems,
                                          seconds=seconds))

    def _join(self, session: str, world_size: int, token: str) -> None:
        try:
            if self.backend != "ipc":  # colocated: no group, the handles come with each push
                self.engine.init_sync(self.host, self.store_port, self.sync_rank, world_size,
                                      self.backend, self.timeout_s,
                                      prefix=f"asyncrl/sync/{session}/{token}")
        except Exception as e:  # the learner went away while forming: wait for the next one
            self._leave(f"could not join weight-sync session {session}: {e}")
            return
        self.session = session
        log.info("%s: joined weight-sync session %s (rank %d of %d)", self.name, session,
                 self.sync_rank, world_size)
        self.hello(force=True)  # tells the learner we are in

    def _reject(self, reason: str, why: str) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason).inc()
        log.warning("%s: %s", self.name, why)

    def _receive(self, msg: wire.WeightsUpdate, inflight: InFlight | None) -> Loaded | None:
        version = msg.policy_version
        nbytes = wire.spec_bytes(msg.tensors)
        if nbytes > self.max_weight_bytes:  # refused before the engine allocates anything
            self._reject("weights_too_large", f"a weight update to version {version} announces "
                         f"{nbytes} bytes, more than this model can hold "
                         f"({self.max_weight_bytes}); refused")
            self._leave("the announced update cannot be received")
            return None
        refused = self._refuse_adapter(msg)
        if refused is not None:  # refused before anything is received
            self._reject(*refused)
            self._leave("the announced update cannot be loaded")
            return None
        if version < self.version:
            log.error("%s: learner pushed version %d but we hold %d; loading it anyway",
                      self.name, version, self.version)
        if inflight is not None:
            inflight.before_update(self.version)
        try:
            seconds, nbytes = self.engine.receive_weights(
                msg.tensors, msg.ipc, msg.bucket_bytes,
                **({"adapter": msg.adapter, "version": version} if msg.adapter else {}))
        except Exception as e:  # peer died mid-push: the buckets before it are loaded
            if inflight is not None:
                inflight.after_update()
            self._leave(f"weight update to version {version} failed: {e}")
            return None
        self.version = version
        self.control.try_send(wire.encode("weights_loaded", version, sender=self.name,
                                          session=self.session, seconds=seconds))
        if inflight is not None:
            inflight.after_update(version)
        return Loaded(version, seconds, nbytes)

    def _refuse_adapter(self, msg: wire.WeightsUpdate) -> tuple[str, str] | None:
        """(reason, why) when the push is not what this engine loads: an adapter where it
        takes weights or weights where it takes adapters, an adapter of a larger rank than
        the engine was started with, or one whose tensors are not adapter tensors."""
        from asyncrl.lora import is_peft_adapter_tensor

        v = msg.policy_version
        if msg.adapter and not self.lora_rank:
            return "adapter_unexpected", (f"a LoRA adapter pushed as version {v}, but this "
                                          "generator runs without model.lora; refused")
        if self.lora_rank and not msg.adapter:
            return "adapter_expected", (f"whole weights pushed as version {v}, but this "
                                        "generator runs model.lora and loads adapters; refused")
        if msg.adapter and msg.adapter["r"] > self.lora_rank:
            return "adapter_rank", (f"a rank-{msg.adapter['r']} adapter pushed as version {v}, "
                                    f"above the engine's model.lora.rank={self.lora_rank}")
        if msg.adapter and not all(is_peft_adapter_tensor(n) for n, _, _ in msg.tensors):
            return "bad_adapter", (f"an adapter pushed as version {v} names tensors that are "
                                   "not LoRA tensors; refused")
        return None

    def _leave(self, why: str) -> None:
        log.warning("%s: %s; keeping policy version %d and waiting for the learner to form a "
                    "new session", self.name, why, self.version)
        self.session = ""
        self.alone_since = time.monotonic()
        try:
            self.engine.leave_sync()
        except Exception:  # noqa: BLE001 - nothing left to release
            pass
        self.hello(force=True)

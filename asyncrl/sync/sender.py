"""The learner-side sender (rank 0 only): keep a weight-sync session formed, push weights.

Control messages go over ZeroMQ (a ROUTER on net.sync_control_port that generators connect
to); tensor bytes go by the session's weight transfer (asyncrl/sync/transfer.py: a bucketed
broadcast over a process group, or CUDA IPC handles when colocated). A push is: weights_update
to every generator (the specs and how they travel), then the transfer's send, then a
weights_loaded from each generator.

Under learner.strategy=fsdp the tensors are gathered from every learner rank as the buckets
fill, so a push is a collective of the learner ranks too: `due` (rank 0 alone) decides, and
`push` consumes the gathered tensors to the end even when the push fails, so the other ranks
are never left waiting in a gather (asyncrl/learner/whole.py, which also retries a failed push
once). `sync` is `due` then `push` for a caller holding the whole model.

Sessions. The group's membership is fixed once formed, so it is re-formed, under a fresh store
prefix (`asyncrl/sync/<session>`), whenever its membership changes:
  - this learner process starts (a torchrun restart is a new process, hence a new session);
  - a generator says hello with a new incarnation (it was restarted);
  - a push fails (a generator died mid-broadcast): the group is dropped, and re-formed with the
    generators heard from after the failure, so a dead one is never waited for;
  - a generator that had joined reports that it left the session (its receive failed).
Generators say hello (name, incarnation, session, policy version) every
net.heartbeat_interval_s; forming waits up to net.ready_timeout_s for every expected generator,
then fails naming the missing ones.

Versions only go forward: a push older than what a generator already holds is skipped (after a
learner restart the learner replays logged steps the generators already have, see
asyncrl/learner/checkpoint.py), and a generator behind the learner is brought up to date as soon
as a session forms.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from asyncrl import wire
from asyncrl.guard import NewStreams, RefusalLog, speaks_for
from asyncrl.sync import group, transfer, weights
from asyncrl.transport import Server

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)


@dataclass
class _Member:
    ident: bytes  # ZeroMQ routing id of its control socket
    incarnation: str
    session: str  # the session it last reported
    version: int  # the newest policy version it reported holding
    heard: float  # time.monotonic() of its last message
    confirmed: bool = False  # reported the current session since it was formed


class WeightSender:
    def __init__(self, server: Server, host: str, store_port: int, num_generators: int,
                 backend: str, timeout_s: float, ready_timeout_s: float,
                 rejected: Counter | None = None, ranks_per_generator: int = 1,
                 dtype: str | None = None, bucket_bytes: int = weights.DEFAULT_BUCKET_BYTES,
                 live_s: float = 5.0, adapter: dict | None = None):
        """rejected: counts, by reason, the control frames refused (a Prometheus counter with
        a `reason` label, LearnerMetrics.messages_rejected). ranks_per_generator: the
        generators' tensor_parallel_size (each worker is a rank of the group). dtype: what
        the engines hold (model.dtype); floating weights are cast to it as they are packed.
        backend `ipc` (colocated): no group; each push hands the engine CUDA IPC handles to
        the packed buffers instead of broadcasting them (asyncrl/sync/ipc.py). bucket_bytes:
        weight_sync.bucket_mb in bytes. live_s: net.heartbeat_timeout_s; a generator heard within it
        is alive, and another incarnation under its name is refused meanwhile. adapter:
        model.lora's (r, lora_alpha, target_modules): pushes are the adapter's tensors
        (transfer.Adapter)."""
        self.server, self.backend, self.rejected = server, backend, rejected
        self.timeout_s, self.ready_timeout_s = timeout_s, ready_timeout_s
        self.expected = [f"gen{i}" for i in range(num_generators)]
        self.world = num_generators * ranks_per_generator + 1
        self.dtype = dtype
        self.host = host
        self.store = group.open_store(host, store_port, True, timeout_s)
        self.tag = uuid.uuid4().hex[:8]  # fresh per learner process, so per torchrun restart
        self.sessions = 0
        self.session = ""
        self.transfer = transfer.for_backend(backend, host, timeout_s, bucket_bytes, dtype,
                                             adapter)
        self.joined: dict[str, str] = {}  # name -> incarnation in the current session
        self.members: dict[str, _Member] = {}
        self.failed_at: float | None = None  # a push failed: wait for fresh hellos
        # The eval_results generators sent, until taken (asyncrl/learner/evals.py joins them).
        self.eval_results: list[wire.EvalResult] = []
        # The newest version a generator can hold: the newest pushed, or the last step a
        # restarted learner replays (it pushed those before; the learner sets that). A hello
        # claiming more would stop every push (versions never move back), so it is refused.
        self.version_bound = wire.MAX_VERSION
        # A resumed learner brings generators that are behind up to its version at once, as a
        # re-formed session does: the learner sets it, the next push clears it.
        self.catch_up = False
        self.streams = NewStreams()  # new incarnations a generator may open (asyncrl/guard.py)
        self.live_s = live_s
        self.refusals = RefusalLog(log, "sync control")

    # ------------------------------------------------------------------ control messages

    def _drain(self, timeout_s: float = 0.0) -> None:
        """Handle every control message waiting (or arriving within timeout_s)."""
        while self.server.sock.poll(int(timeout_s * 1000)):
            timeout_s = 0.0
            got = self.server.recv()
            if got is None:
                self._reject("bad_framing", "not a DEALER-shaped message")
                continue
            try:
                msg = self._accept(got)
            except wire.MessageError as e:
                self._reject(e.reason, str(e), got.role)
                continue
            if msg.kind == "eval_result":
                self.eval_results.append(msg)
            else:
                self._handle(got.ident, msg)

    def _accept(self, got) -> wire.GeneratorHello | wire.WeightsLoaded | wire.EvalResult:
        """The control message of a request, or MessageError naming why it is refused."""
        msg = wire.decode(got.payload, expect=("generator_hello", "weights_loaded",
                                               "eval_result"))
        if msg.sender not in self.expected:  # bounds self.members to the generators
            raise wire.MessageError("unknown_sender", f"{msg.sender!r} is not one of gen0.."
                                                      f"gen{len(self.expected) - 1}")
        if not speaks_for(got.role, msg.sender):
            raise wire.MessageError("sender_mismatch", f"sender {msg.sender!r} from a peer "
                                                       f"holding {got.role}'s key")
        claimed = max(msg.policy_version, getattr(msg, "asked", 0))
        if claimed > self.version_bound:
            raise wire.MessageError("version_ahead", (
                f"{msg.kind} from {msg.sender} at policy version {claimed}: the learner is "
                f"at {self.version_bound}"))
        m = self.members.get(msg.sender)
        if msg.kind != "generator_hello" or (m is not None and m.incarnation == msg.incarnation):
            return msg
        # A new incarnation of a generator: a restart, whose old process has gone quiet. One
        # that claims the name while the old one still speaks would take its place in the
        # session (and each such switch re-forms it), so it waits until the old one is silent.
        silent = time.monotonic() - m.heard if m is not None else float("inf")
        if silent < self.live_s:
            raise wire.MessageError("incarnation_conflict", (
                f"{msg.sender} as incarnation {msg.incarnation!r} while {m.incarnation!r} was "
                f"heard {silent:.1f}s ago (a restart is taken once the old one is silent for "
                f"net.heartbeat_timeout_s={self.live_s:g})"))
        if not self.streams.allows(msg.sender):
            raise wire.MessageError("too_many_incarnations", (
                f"{msg.sender} opened more than {self.streams.limit} incarnations in "
                f"{self.streams.window_s:.0f}s"))
        return msg

    def poll(self, timeout_s: float = 0.0) -> None:
        """Handle the control messages waiting (or arriving within timeout_s)."""
        self._drain(timeout_s)

    def ask_eval(self, name: str, version: int) -> str | None:
        """Ask generator `name` to evaluate the version it holds; the incarnation asked, or
        None when it is unknown or its socket would not take the message."""
        m = self.members.get(name)
        if m is None or not self.server.send(m.ident, wire.encode("eval_request", version)):
            return None
        return m.incarnation

    def _reject(self, reason: str, detail: str, role: str | None = None) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason).inc()
        self.refusals.refused(reason, role, detail)

    def _handle(self, ident: bytes, msg: wire.GeneratorHello | wire.WeightsLoaded) -> None:
        name, now = msg.sender, time.monotonic()
        m = self.members.get(name)
        if msg.kind == "weights_loaded":
            if m is not None and msg.session == self.session:
                m.version, m.heard = max(m.version, msg.policy_version), now
            return
        if m is None or m.incarnation != msg.incarnation:
            if m is not None:
                log.warning("%s restarted (incarnation %s -> %s); the weight-sync group will "
                            "re-form", name, m.incarnation, msg.incarnation)
            self.streams.opened(name)
            self.members[name] = _Member(ident, msg.incarnation, msg.session,
                                         msg.policy_version, now)
            return
        m.ident, m.heard, m.session = ident, now, msg.session
        m.version = max(m.version, msg.policy_version)
        if msg.session == self.session and self.session:
            m.confirmed = True

    def _needs_forming(self) -> bool:
        if not self.transfer.connected:
            return True
        for name, inc in self.joined.items():
            m = self.members[name]
            if m.incarnation != inc or (m.confirmed and m.session != self.session):
                return True
        return False

    # ------------------------------------------------------------------ sessions

    def _await_members(self) -> None:
        """Every expected generator has said hello (after the last failure, if any)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            since = self.failed_at if self.failed_at is not None else -1.0
            missing = [n for n in self.expected
                       if n not in self.members or self.members[n].heard <= since]
            if not missing:
                return
            if time.monotonic() > deadline:
                have = sorted(set(self.expected) - set(missing))
                raise TimeoutError(
                    f"weight sync: generators {missing} did not say hello within "
                    f"{self.ready_timeout_s:.0f}s (have: {have or 'none'}). Are they running and "
                    "pointed at net.learner_host? The limit is net.ready_timeout_s")
            self._drain(timeout_s=0.5)

    def _form(self) -> None:
        self._await_members()
        self.transfer.close()  # the old session's first (its peers' pending receives then fail)
        self.sessions += 1
        self.session = f"{self.tag}.{self.sessions}"
        # The group's store keys live under a prefix with a secret that only generators told
        # over the authenticated control channel know: a peer that reaches the (unauthenticated)
        # store cannot find the session's keys to join it.
        token = secrets.token_hex(16)
        join = wire.encode("sync_join", 0, session=self.session, world_size=self.world,
                           token=token)
        for name in self.expected:
            m = self.members[name]
            m.confirmed = False
            self.server.send(m.ident, join)
        self.joined = {n: self.members[n].incarnation for n in self.expected}
        t0 = time.perf_counter()
        self.transfer.connect(self.store, f"asyncrl/sync/{self.session}/{token}", self.world)
        self.failed_at = None
        log.info("weight-sync session %s formed with %s in %.2fs (versions %s)", self.session,
                 ", ".join(f"{n}/{inc}" for n, inc in self.joined.items()),
                 time.perf_counter() - t0, self.versions())

    def versions(self) -> dict[str, int]:
        return {n: self.members[n].version for n in self.expected if n in self.members}

    def start(self) -> None:
        """Wait for every generator and form the first session of this learner process."""
        self._drain()
        self._form()

    def shutdown(self, reason: str) -> None:
        """Tell every generator training is over, so standalone ones exit too."""
        msg = wire.encode("shutdown", 0, reason=reason)
        for m in self.members.values():
            self.server.send(m.ident, msg)

    # ------------------------------------------------------------------ pushes

    def due(self, version: int, due: bool) -> bool:
        """Re-form the session if its membership changed, and say whether to push `version`
        now: when due (weight_sync.interval) or when a generator is behind after a re-form, never to
        move a generator back."""
        self._drain()
        formed = self._needs_forming()
        if formed:
            self._form()
        held = self.versions()
        if min(held.values()) >= version:
            # Every generator holds this version or a newer one: the learner is replaying
            # logged steps after a restart; never move a generator back.
            return False
        if max(held.values()) > version:
            return False
        return due or ((formed or self.catch_up) and min(held.values()) < version)

    def push(self, version: int, specs: list[list],
             tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[float, int]:
        """Push `version`: `tensors` are the whole tensors of `specs` (weights.specs_of of the
        state_dict, cast to the engines' dtype as they are packed), taken one at a time. They
        are consumed to the end whatever happens. Returns (seconds, bytes); a failure drops
        the group (the next `due` re-forms it with the generators heard from since) and
        raises."""
        it = iter(tensors)
        try:
            return self._push(version, specs, it)
        except (RuntimeError, TimeoutError):
            self.transfer.close()
            self.failed_at = time.monotonic()
            raise
        finally:
            for _ in it:  # under fsdp each is a gather the other ranks are in
                pass

    def sync(self, model: torch.nn.Module, version: int, due: bool) -> tuple[float, int] | None:
        """`due` then `push` of a model held whole in this process. Returns (seconds, bytes)
        of the push, or None when nothing was pushed. A failure raises (the learner retries
        it once, asyncrl/learner/whole.py)."""
        if not self.due(version, due):
            return None
        named = weights.sendable(model)
        return self.push(version, weights.specs_of(named, self.dtype), named)

    @property
    def peak_buffer_bytes(self) -> int:
        """The most bytes of push buffers the transfer held at once."""
        return self.transfer.peak_buffer_bytes

    def _push(self, version: int, specs: list[list],
              tensors: Iterator[tuple[str, torch.Tensor]]) -> tuple[float, int]:
        t0 = time.perf_counter()
        self.version_bound = max(self.version_bound, version)  # the generators may hold it now
        self.catch_up = False
        announce = wire.encode("weights_update", version, session=self.session, tensors=specs,
                               **self.transfer.announce(specs, tensors))
        for name in self.expected:
            self.server.send(self.members[name].ident, announce)
        self.transfer.send(specs, tensors)
        deadline = time.monotonic() + self.timeout_s
        while waiting := [n for n in self.expected if self.members[n].version < version]:
            if self._needs_forming():
                raise RuntimeError(f"generators {waiting} left the session before confirming")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"weight sync to version {version}: generators {waiting} did not confirm "
                    f"loading within {self.timeout_s:.0f}s (weight_sync.timeout_s)")
            self._drain(timeout_s=0.2)
        return time.perf_counter() - t0, wire.spec_bytes(specs)

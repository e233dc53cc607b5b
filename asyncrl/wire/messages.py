"""Every message asyncrl sends, one class per kind: its direction, its fields, their types and
bounds. `decode` returns one of these objects (attribute access, no string keys); `encode`
checks what a sender passes against the same declarations. SCHEMA, the kind -> field -> check
table the codec and the fuzz tests read, is derived from the classes, so there is one list of
fields.

Every message also carries `policy_version`: the learner version its sender last knew (for
eval_request, the version the learner wants evaluated; for eval_result, the version the engine
held while it evaluated).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, get_type_hints

from asyncrl.wire.fields import (
    INT64_MAX,
    MAX_BUCKET_BYTES,
    MAX_GROUPS_PER_REQUEST,
    MAX_NAME,
    MAX_RANKS,
    MAX_REASON,
    MAX_VERSION,
    AdapterSpec,
    Float,
    Floats,
    Int,
    IpcHandles,
    Str,
    TensorSpecs,
    Texts,
)
from asyncrl.wire.groups import Groups, TrajectoryGroup

NAME = Str(MAX_NAME)  # sender names, incarnations, sessions
REASON = Str(MAX_REASON)
VERSION = Int(0, MAX_VERSION, reason="bad_version")  # policy_version, every message's
SECRET = Str(MAX_NAME, nonempty=True)


@dataclass(frozen=True, slots=True)
class Message:
    kind: ClassVar[str]
    policy_version: Annotated[int, VERSION]

    def as_dict(self) -> dict[str, Any]:
        """kind and the declared fields with their values (shallow: for logs and tests)."""
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True, slots=True)
class Trajectories(Message):
    """generator -> buffer: groups of sampled completions, message `seq` of the stream
    (sender, incarnation)."""

    kind: ClassVar[str] = "trajectories"
    sender: Annotated[str, NAME]
    incarnation: Annotated[str, NAME]
    seq: Annotated[int, Int(0, INT64_MAX)]
    groups: Annotated[list[TrajectoryGroup], Groups()]


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """buffer -> generator: the fate of trajectories message `seq` (-1: too broken to read)."""

    kind: ClassVar[str] = "ack"
    seq: Annotated[int, Int(-1, INT64_MAX)]
    status: Annotated[str, Str(16, ("ok", "busy", "rejected"))]
    reason: Annotated[str, REASON]


@dataclass(frozen=True, slots=True)
class BatchRequest(Message):
    """learner -> buffer: num_groups groups usable at policy_version, for learner rank `rank`."""

    kind: ClassVar[str] = "batch_request"
    rank: Annotated[int, Int(0, MAX_RANKS - 1)]
    num_groups: Annotated[int, Int(1, MAX_GROUPS_PER_REQUEST)]


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """buffer -> learner: status ok (the groups) or not_ready, and the stale-drop counter."""

    kind: ClassVar[str] = "batch"
    status: Annotated[str, Str(16, ("ok", "not_ready"))]
    groups: Annotated[list[TrajectoryGroup], Groups()]
    stale_dropped_total: Annotated[int, Int(0, INT64_MAX)]


@dataclass(frozen=True, slots=True)
class GeneratorHello(Message):
    """generator -> learner: "I am here, in sync session `session` ("" until joined), holding
    policy_version"; sent at start and every net.heartbeat_interval_s."""

    kind: ClassVar[str] = "generator_hello"
    sender: Annotated[str, NAME]
    sync_rank: Annotated[int, Int(0, MAX_RANKS - 1)]
    incarnation: Annotated[str, NAME]  # new per generator process
    session: Annotated[str, NAME]


@dataclass(frozen=True, slots=True)
class SyncJoin(Message):
    """learner -> generator: join weight-sync session `session` of world_size ranks; `token`
    is the secret part of the store prefix."""

    kind: ClassVar[str] = "sync_join"
    session: Annotated[str, SECRET]
    world_size: Annotated[int, Int(2, MAX_RANKS)]
    token: Annotated[str, SECRET]


@dataclass(frozen=True, slots=True)
class WeightsUpdate(Message):
    """learner -> generator: broadcasts of these tensors follow on session `session`, in
    buckets of at most bucket_bytes (both ends split `tensors` into the same buckets:
    asyncrl/sync/weights.py plan_buckets); `ipc` holds CUDA IPC handles for a colocated push,
    [] for a broadcast; `adapter` is {} for the weights, or the LoRA adapter these tensors
    are (model.lora: r, lora_alpha, target_modules), loaded as its own adapter."""

    kind: ClassVar[str] = "weights_update"
    session: Annotated[str, SECRET]
    tensors: Annotated[list, TensorSpecs()]
    ipc: Annotated[list, IpcHandles()]
    bucket_bytes: Annotated[int, Int(1, MAX_BUCKET_BYTES)]
    adapter: Annotated[dict, AdapterSpec()]


@dataclass(frozen=True, slots=True)
class WeightsLoaded(Message):
    """generator -> learner: the weights of policy_version are live in the engine."""

    kind: ClassVar[str] = "weights_loaded"
    sender: Annotated[str, NAME]
    session: Annotated[str, NAME]
    seconds: Annotated[float, Float(0.0, 1e9)]


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """learner -> generator: training finished, exit (status 0)."""

    kind: ClassVar[str] = "shutdown"
    reason: Annotated[str, REASON]


@dataclass(frozen=True, slots=True)
class EvalRequest(Message):
    """learner -> generator: evaluate (held-out, greedy) the policy version you hold;
    policy_version is the one the learner wants (the one it just pushed)."""

    kind: ClassVar[str] = "eval_request"


@dataclass(frozen=True, slots=True)
class EvalResult(Message):
    """generator -> learner: one evaluation's accuracy over `problems` held-out problems;
    policy_version is the version evaluated, `asked` the version the request named."""

    kind: ClassVar[str] = "eval_result"
    sender: Annotated[str, NAME]
    asked: Annotated[int, VERSION]
    accuracy: Annotated[float, Float(-1e6, 1e6)]
    problems: Annotated[int, Int(0, 2**31 - 1)]
    seconds: Annotated[float, Float(0.0, 1e9)]


@dataclass(frozen=True, slots=True)
class Error(Message):
    """any reply: the request was rejected, and why."""

    kind: ClassVar[str] = "error"
    reason: Annotated[str, REASON]


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """generator, learner -> buffer: "I am alive" (no reply)."""

    kind: ClassVar[str] = "heartbeat"
    sender: Annotated[str, NAME]
    role: Annotated[str, Str(16)]


@dataclass(frozen=True, slots=True)
class ScoreRequest(Message):
    """generator -> reward service: score each (prompts[i], completions[i]) with the reward
    model; request `seq` of the stream (sender, incarnation). Resent until answered."""

    kind: ClassVar[str] = "score_request"
    sender: Annotated[str, NAME]
    incarnation: Annotated[str, NAME]
    seq: Annotated[int, Int(0, INT64_MAX)]
    prompts: Annotated[list, Texts()]
    completions: Annotated[list, Texts()]


@dataclass(frozen=True, slots=True)
class Scores(Message):
    """reward service -> generator: the scores of request `seq` (status ok, one per text),
    or busy (its queue is full: send again later) or rejected (the request is invalid;
    seq -1 when it could not be read)."""

    kind: ClassVar[str] = "scores"
    seq: Annotated[int, Int(-1, INT64_MAX)]
    status: Annotated[str, Str(16, ("ok", "busy", "rejected"))]
    reason: Annotated[str, REASON]
    scores: Annotated[list, Floats()]


MESSAGES: dict[str, type[Message]] = {cls.kind: cls for cls in (
    Trajectories, Ack, BatchRequest, Batch, GeneratorHello, SyncJoin, WeightsUpdate,
    WeightsLoaded, Shutdown, EvalRequest, EvalResult, Error, Heartbeat, ScoreRequest, Scores)}
KINDS = tuple(MESSAGES)


def _checks(cls: type[Message]) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name].__metadata__[0] for f in fields(cls)}


# kind -> field -> its check, without policy_version (the header's).
SCHEMA: dict[str, dict[str, Any]] = {
    kind: {k: v for k, v in _checks(cls).items() if k != "policy_version"}
    for kind, cls in MESSAGES.items()}

"""Every message asyncrl sends over ZeroMQ, its fields, and the msgpack codec.

A frame is `MAGIC | crc32(payload) | payload` (4 + 4 bytes of header, little-endian), where
the payload is one msgpack map with at least `kind`, `schema` (SCHEMA_VERSION) and
`policy_version` (the learner version the sender last knew). The checksum catches corrupted
frames that would otherwise still decode into a valid-looking record. Arrays travel as a msgpack
extension (code 1): dtype, shape and raw little-endian bytes, never Python lists.
Trajectory groups travel as columns: one array per field for all the groups of a message
(`group_columns`), so decoding and checking cost a few numpy calls per message, not several
Python objects per completion.

One class per kind, in messages.py, declares its fields with their types and bounds (SCHEMA is
derived from them). `decode` checks a received map against them and returns the message
object (`msg.seq`, never `msg["seq"]`), or raises `MessageError` with a short `reason` that
the receiver counts in Prometheus, whatever the map holds: each check looks at a value's type
before it compares, hashes or sums the value, so a receiver never crashes on a frame. `encode`
checks what a sender builds against the same declarations and raises ValueError naming the
field, so a sender bug fails at the sender.

  fields.py    the bounds, MessageError, the field types (Int, Float, Str, TensorSpecs, ...)
  groups.py    Completion, TrajectoryGroup, and their columns (group_columns, parse_groups)
  messages.py  the message classes, one per kind, and SCHEMA
  codec.py     frames, arrays, encode and decode

Message kinds (docs/architecture.md has the table with directions and sockets):
  trajectories      generator -> buffer   groups of sampled completions
  ack               buffer -> generator   status ok | busy | rejected
  batch_request     learner -> buffer     ask for num_groups groups usable at policy_version
  batch             buffer -> learner     status ok | not_ready, the groups, drop counters
  generator_hello   generator -> learner  "I am here, in sync session S, holding version v";
                                          sent at start and every net.heartbeat_interval_s
  sync_join         learner -> generator  join weight-sync session S (a fresh store prefix)
  weights_update    learner -> generator  broadcasts of these tensors, in buckets of at most
    bucket_bytes, follow on session S; `adapter`: {} for the weights, or the LoRA adapter
    (model.lora) they are
  weights_loaded    generator -> learner  the new weights are live in the engine
  shutdown          learner -> generator  training finished: exit (status 0)
  eval_request      learner -> generator  evaluate the policy version you hold (held-out, greedy)
  eval_result       generator -> learner  the accuracy of one evaluation, tagged with the version
                                          evaluated and the version asked for
  error             any reply             the request was rejected and why
  heartbeat         generator, learner -> buffer   "I am alive" (no reply)
  score_request     generator -> reward   score these (prompt, completion) texts
  scores            reward -> generator   status ok (one score per text) | busy | rejected
"""

from asyncrl.wire.codec import (
    MAGIC,
    MAX_FRAME_BYTES,
    SCHEMA_VERSION,
    _default,
    _unpack_array,
    decode,
    encode,
    seal,
)
from asyncrl.wire.fields import (
    DEFAULT_BUCKET_BYTES,
    INT64_MAX,
    MAX_BUCKET_BYTES,
    MAX_GROUPS_PER_REQUEST,
    MAX_NAME,
    MAX_RANKS,
    MAX_REASON,
    MAX_TENSORS,
    MAX_VERSION,
    MAX_WEIGHT_BYTES,
    WEIGHT_DTYPES,
    AdapterSpec,
    Float,
    Floats,
    Int,
    IpcHandles,
    MessageError,
    Str,
    TensorSpecs,
    Texts,
    spec_bytes,
)
from asyncrl.wire.groups import Completion, Groups, TrajectoryGroup, group_columns, parse_groups
from asyncrl.wire.messages import (
    KINDS,
    MESSAGES,
    SCHEMA,
    Ack,
    Batch,
    BatchRequest,
    Error,
    EvalRequest,
    EvalResult,
    GeneratorHello,
    Heartbeat,
    Message,
    ScoreRequest,
    Scores,
    Shutdown,
    SyncJoin,
    Trajectories,
    WeightsLoaded,
    WeightsUpdate,
)

__all__ = [
    "MAGIC", "MAX_FRAME_BYTES", "SCHEMA_VERSION", "decode", "encode", "seal",
    "DEFAULT_BUCKET_BYTES", "INT64_MAX", "MAX_BUCKET_BYTES", "MAX_GROUPS_PER_REQUEST", "MAX_NAME",
    "MAX_RANKS", "MAX_REASON", "MAX_TENSORS", "MAX_VERSION", "MAX_WEIGHT_BYTES", "WEIGHT_DTYPES",
    "AdapterSpec", "Float", "Floats", "Int", "IpcHandles", "MessageError", "Str", "TensorSpecs",
    "Texts", "spec_bytes",
    "Completion", "Groups", "TrajectoryGroup", "group_columns", "parse_groups",
    "KINDS", "MESSAGES", "SCHEMA", "Ack", "Batch", "BatchRequest", "Error", "EvalRequest",
    "EvalResult", "GeneratorHello", "Heartbeat", "Message", "ScoreRequest", "Scores",
    "Shutdown", "SyncJoin",
    "Trajectories", "WeightsLoaded", "WeightsUpdate", "_default", "_unpack_array",
]

"""Every message asyncrl sends over ZeroMQ, its fields, and the msgpack codec.

A frame is `MAGIC | crc32(payload) | payload` (4 + 4 bytes of header, little-endian), where
the payload is one msgpack map with at least `kind`, `schema` (SCHEMA_VERSION) and
`policy_version` (the learner version the sender last knew). The checksum catches corrupted
frames that would otherwise still decode into a valid-looking record. Arrays travel as a msgpack
extension (code 1): dtype, shape and raw little-endian bytes, never Python lists.
Trajectory groups travel as columns: one array per field for all the groups of a message
(`group_columns`), so decoding and checking cost a few numpy calls per message, not several
Python objects per completion.

The fields of every kind, their types and bounds are declared once, in SCHEMA. `decode` checks
a received map against it and raises `MessageError` with a short `reason` that the receiver
counts in Prometheus, whatever the map holds: each check looks at a value's type before it
compares, hashes or sums the value, so a receiver never crashes on a frame. `encode` checks
what a sender builds against the same table and raises ValueError naming the field, so a sender
bug fails at the sender. Of the group columns, encode checks the types (1-D arrays of the
declared dtypes, lists of bounded strings); whether their values fit together (lengths add up,
logprobs <= 0, ids in the vocabulary) is the receiver's check alone, since those values come
from the model and the tests build such frames on purpose.

Message kinds (docs/architecture.md has the table with directions and sockets):
  trajectories      generator -> buffer   groups of sampled completions
  ack               buffer -> generator   status ok | busy | rejected
  batch_request     learner -> buffer     ask for num_groups groups usable at policy_version
  batch             buffer -> learner     status ok | not_ready, the groups, drop counters
  generator_hello   generator -> learner  "I am here, in sync session S, holding version v";
                                          sent at start and every net.heartbeat_interval_s
  sync_join         learner -> generator  join weight-sync session S (a fresh store prefix)
  weights_update    learner -> generator  broadcasts of these tensors, in buckets of at most
                                          bucket_bytes, follow on session S
  weights_loaded    generator -> learner  the new weights are live in the engine
  shutdown          learner -> generator  training finished: exit (status 0)
  eval_request      learner -> generator  evaluate the policy version you hold (held-out, greedy)
  eval_result       generator -> learner  the accuracy of one evaluation, tagged with the version
                                          evaluated and the version asked for
  error             any reply             the request was rejected and why
  heartbeat         generator, learner -> buffer   "I am alive" (no reply)
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# 2: groups travel as columns (one array per field per message).
# 3: each group carries its identity (incarnation, seq, index; asyncrl/buffer/journal.py)
#    and each token the policy version that sampled it (`version_lag`: the version minus
#    its group's policy_version, which is the group's oldest token's).
SCHEMA_VERSION = 4  # 4: weights_update says its bucket_bytes (bucketed pushes)
MAGIC = b"ARL1"
_ARRAY_EXT = 1
_DTYPES = {"int32", "int64", "float32", "float64", "uint8", "float16"}
_LE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _DTYPES}
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_ARRAY_DIMS = 8  # group columns are 1-D; nothing else travels as an array

INT64_MAX = 2**63 - 1
MAX_VERSION = 2**40 - 1  # policy versions: optimizer steps
MAX_NAME = 64  # sender, incarnation, session, generator: dict keys and metric labels
MAX_REASON = 1024  # free text: reasons, errors
MAX_GROUPS_PER_REQUEST = 2**20  # a batch of more would not fit in MAX_FRAME_BYTES anyway
MAX_RANKS = 2**16  # learner ranks, weight-sync ranks
# The dtypes asyncrl/sync/weights.py can broadcast, and their sizes in bytes.
WEIGHT_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_TENSORS = 2**18  # tensors in one weights_update (a 670B MoE checkpoint has ~10**5)
MAX_TENSOR_NAME = 512
MAX_TENSOR_DIMS = 8
MAX_TENSOR_DIM = 2**40
MAX_BUCKET_BYTES = 2**36  # 64 GiB: sync.bucket_mb's bound
DEFAULT_BUCKET_BYTES = 64 << 20  # sync.bucket_mb's default, for callers without a config
MAX_WEIGHT_BYTES = 2**41  # 2 TiB: the wire's bound; a generator also checks its own model's


class MessageError(ValueError):
    """A frame that is not a valid message. `reason` is a short label for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------- arrays


def _pack_array(a: np.ndarray) -> msgpack.ExtType:
    dt = a.dtype.name
    if dt not in _DTYPES:
        raise TypeError(f"dtype {dt} cannot go on the wire")
    if a.ndim > MAX_ARRAY_DIMS:
        raise TypeError(f"an array of {a.ndim} dimensions cannot go on the wire")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    head = struct.pack("<B", len(dt)) + dt.encode() + struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape)
    return msgpack.ExtType(_ARRAY_EXT, head + a.tobytes())


def _unpack_array(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        raise MessageError("bad_array", f"unknown extension type {code}")
    try:
        n = data[0]
        dt = data[1 : 1 + n].decode()
        ndim = data[1 + n]
        off = 2 + n
        shape = struct.unpack_from(f"<{ndim}I", data, off)
        off += 4 * ndim
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise MessageError("bad_array", f"truncated array header ({e})") from None
    dtype = _LE_DTYPES.get(dt)
    if dtype is None:
        raise MessageError("bad_array", f"dtype {dt!r:.40} not allowed")
    if ndim > MAX_ARRAY_DIMS:
        raise MessageError("bad_array", f"{ndim} dimensions > {MAX_ARRAY_DIMS}")
    count = math.prod(shape)
    if len(data) - off != count * dtype.itemsize:
        raise MessageError("bad_array", f"{len(data) - off} data bytes for shape {shape} {dt}")
    return np.frombuffer(data, dtype, count, off).reshape(shape)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


# ---------------------------------------------------------------- records


@dataclass
class Completion:
    tokens: np.ndarray  # (T,) int32, sampled token ids
    logprobs: np.ndarray  # (T,) float32, behaviour logprob of each sampled token
    reward: float
    finish_reason: str  # "stop" | "length"
    # (T,) int64, the policy version that sampled each token (a completion generated across
    # a weight update spans several); None: every token at its group's policy_version.
    versions: np.ndarray | None = None


@dataclass
class TrajectoryGroup:
    """The `group_size` completions of one prompt, sampled under one policy version."""

    prompt_id: int
    prompt_tokens: np.ndarray  # (P,) int32
    policy_version: int
    completions: list[Completion]
    generator: str = ""
    created_at: float = 0.0
    # Identity, stamped by the buffer on acceptance (asyncrl/buffer/journal.py): the sender's
    # incarnation, the message's seq in that stream, the group's index in the message.
    incarnation: str = ""
    seq: int = -1
    index: int = -1

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.completions)


# ---------------------------------------------------------------- field types
#
# Each field type's `check(value, where, vocab_size, build)` returns what the receiver gets
# (the value itself, or for `groups` the TrajectoryGroups when `build`), or raises MessageError.
# `type(v) is int` rather than isinstance: a bool is not a count, and a numpy scalar never
# comes out of msgpack (encode turns them into Python numbers first).


def _type_name(v: Any) -> str:
    return type(v).__name__


def _brief(v: Any) -> str:
    """A received value for an error message: never repr() of a container, which may be nested
    deeper than repr can recurse."""
    if type(v) in (str, bytes):
        return repr(v[:40])
    return repr(v) if type(v) is int else f"<{_type_name(v)}>"


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int  # inclusive
    reason: str = "bad_value"  # label when out of range

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> int:
        if type(v) is not int:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not int")
        if not self.lo <= v <= self.hi:
            raise MessageError(self.reason, f"{where}={v} outside [{self.lo}, {self.hi}]")
        return v


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> float:
        if type(v) not in (int, float):
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not float")
        if not (math.isfinite(v) and self.lo <= v <= self.hi):
            raise MessageError("bad_value", f"{where}={v} not finite in [{self.lo}, {self.hi}]")
        return v


@dataclass(frozen=True)
class Str:
    max_len: int
    choices: tuple[str, ...] = ()  # when given, the only values allowed
    nonempty: bool = False

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> str:
        if type(v) is not str:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not str")
        if len(v) > self.max_len:
            raise MessageError("bad_value", f"{where} longer than {self.max_len} characters")
        if self.choices and v not in self.choices:
            raise MessageError("bad_value", f"{where}={v!r} not one of {self.choices}")
        if self.nonempty and not v:
            raise MessageError("bad_value", f"{where} is empty")
        return v


@dataclass(frozen=True)
class TensorSpecs:
    """`[[name, dtype, shape], ...]`: what a weights_update broadcast holds, in order. Each
    piece is tested inline (a 0.5B model has ~290 specs, the bound is 2**18); the field types
    below say why when a test fails."""

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> list:
        if type(v) is not list:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not a list")
        if len(v) > MAX_TENSORS:
            raise MessageError("bad_value", f"{where}: {len(v)} tensors > {MAX_TENSORS}")
        names: set[str] = set()
        total = 0
        for i, spec in enumerate(v):
            if type(spec) is not list or len(spec) != 3:
                raise MessageError("bad_value", f"{where}[{i}] is not [name, dtype, shape]")
            name, dtype, shape = spec
            if type(name) is not str or not 0 < len(name) <= MAX_TENSOR_NAME:
                _TENSOR_NAME.check(name, f"{where}[{i}].name", vocab_size, build)
            if type(dtype) is not str or dtype not in WEIGHT_DTYPES:
                _TENSOR_DTYPE.check(dtype, f"{where}[{i}].dtype", vocab_size, build)
            if type(shape) is not list or len(shape) > MAX_TENSOR_DIMS:
                raise MessageError("bad_value", f"{where}[{i}].shape is not a list of <= "
                                                f"{MAX_TENSOR_DIMS} sizes")
            count = 1
            for d, size in enumerate(shape):
                if type(size) is not int or not 0 <= size <= MAX_TENSOR_DIM:
                    _TENSOR_DIM.check(size, f"{where}[{i}].shape[{d}]", vocab_size, build)
                count *= size
            if name in names:
                raise MessageError("bad_value", f"{where}[{i}]: tensor {name!r:.80} listed "
                                                "twice")
            names.add(name)
            total += count * WEIGHT_DTYPES[dtype]
            if total > MAX_WEIGHT_BYTES:
                raise MessageError("bad_value", f"{where} describe more than "
                                                f"{MAX_WEIGHT_BYTES} bytes")
        return v


_TENSOR_NAME = Str(MAX_TENSOR_NAME, nonempty=True)
_TENSOR_DTYPE = Str(16, choices=tuple(WEIGHT_DTYPES))
_TENSOR_DIM = Int(0, MAX_TENSOR_DIM)


def spec_bytes(specs: list) -> int:
    """Bytes a weights_update's (checked) tensor specs describe."""
    return sum(math.prod(shape) * WEIGHT_DTYPES[dt] for _, dt, shape in specs)


# ---------------------------------------------------------------- group columns

# column -> numpy kinds allowed, 1-D. Per group: prompt_id .. group_size; per completion:
# length, reward; concatenated: prompt_tokens, tokens, logprobs.
_ARRAY_COLUMNS = {
    "prompt_id": "iu", "policy_version": "iu", "created_at": "f", "prompt_len": "iu",
    "group_size": "iu", "length": "iu", "reward": "f", "prompt_tokens": "iu", "tokens": "iu",
    "logprobs": "f", "seq": "i", "index": "i", "version_lag": "iu",
}
# column -> longest string allowed (per group: generator, incarnation; per completion:
# finish_reason)
_STRING_COLUMNS = {"generator": MAX_NAME, "incarnation": MAX_NAME, "finish_reason": 32}
_MAX_LENGTH = 2**31 - 1  # one prompt, one completion, one group: fits int32


def group_columns(groups: list[TrajectoryGroup]) -> dict:
    """The `groups` field: per group prompt_id, policy_version, created_at, generator,
    incarnation, seq, index, prompt_len, group_size; prompt_tokens concatenated; per
    completion length, reward, finish_reason; tokens and logprobs concatenated."""
    comps = [c for g in groups for c in g.completions]

    def cat(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    return {
        "prompt_id": np.array([g.prompt_id for g in groups], np.int64),
        "policy_version": np.array([g.policy_version for g in groups], np.int64),
        "created_at": np.array([g.created_at for g in groups], np.float64),
        "generator": [g.generator for g in groups],
        "incarnation": [g.incarnation for g in groups],
        "seq": np.array([g.seq for g in groups], np.int64),
        "index": np.array([g.index for g in groups], np.int32),
        "prompt_len": np.array([len(g.prompt_tokens) for g in groups], np.int32),
        "prompt_tokens": cat([g.prompt_tokens for g in groups], "int32"),
        "group_size": np.array([len(g.completions) for g in groups], np.int32),
        "length": np.array([len(c.tokens) for c in comps], np.int32),
        "tokens": cat([c.tokens for c in comps], "int32"),
        "logprobs": cat([c.logprobs for c in comps], "float32"),
        "version_lag": cat([np.zeros(len(c.tokens), np.int32) if c.versions is None
                            else np.asarray(c.versions, np.int64) - g.policy_version
                            for g in groups for c in g.completions], "int32"),
        "reward": np.array([c.reward for c in comps], np.float64),
        "finish_reason": [c.finish_reason for c in comps],
    }


def _typed_columns(cols: Any) -> dict:
    """Every declared column present with its type: 1-D arrays of the allowed kinds, lists of
    bounded strings. Columns not declared are ignored."""
    if type(cols) is not dict:
        raise MessageError("bad_type", f"groups is {_type_name(cols)}, not a map of columns")
    out = {}
    for key, kinds in _ARRAY_COLUMNS.items():
        if key not in cols:
            raise MessageError("missing_field", f"groups.{key}")
        a = cols[key]
        if type(a) is not np.ndarray:
            raise MessageError("bad_type", f"groups.{key} is {_type_name(a)}, not an array")
        if a.ndim != 1 or a.dtype.kind not in kinds:
            raise MessageError("bad_array", f"groups.{key} has shape {a.shape} dtype {a.dtype}")
        out[key] = a
    for key, max_len in _STRING_COLUMNS.items():
        if key not in cols:
            raise MessageError("missing_field", f"groups.{key}")
        v = cols[key]
        if type(v) is not list:
            raise MessageError("bad_type", f"groups.{key} is {_type_name(v)}, not a list")
        if not all(type(x) is str for x in v):
            raise MessageError("bad_type", f"groups.{key} holds a non-string")
        if any(len(x) > max_len for x in v):
            raise MessageError("bad_value", f"groups.{key} holds a string longer than {max_len}")
        out[key] = v
    return out


def _within(a: np.ndarray, lo: int, hi: int) -> bool:
    return len(a) == 0 or (int(a.min()) >= lo and int(a.max()) <= hi)


def _checked_columns(cols: Any, vocab_size: int | None) -> dict:
    """The columns of a `groups` field checked as a whole, in dependency order: types, then the
    bounds of single values, then the sums and counts that tie the columns together."""
    c = _typed_columns(cols)
    n_groups = len(c["prompt_id"])
    for k in ("policy_version", "created_at", "prompt_len", "group_size", "generator",
              "incarnation", "seq", "index"):
        if len(c[k]) != n_groups:
            raise MessageError("inconsistent", f"groups.{k} has {len(c[k])}, prompt_id "
                                               f"{n_groups}")
    # Bounds before sums: int64 sums of unbounded lengths can wrap around to any total.
    if not _within(c["group_size"], 1, _MAX_LENGTH):
        raise MessageError("inconsistent", f"a group has no completions or more than "
                                           f"{_MAX_LENGTH}")
    for k in ("prompt_len", "length"):
        if not _within(c[k], 0, _MAX_LENGTH):
            raise MessageError("inconsistent", f"groups.{k} outside [0, {_MAX_LENGTH}]")
    n_comps = len(c["length"])
    if int(c["group_size"].sum()) != n_comps or len(c["reward"]) != n_comps:
        raise MessageError("inconsistent", f"group sizes add up to {int(c['group_size'].sum())}, "
                                           f"length has {n_comps}, reward {len(c['reward'])}")
    if len(c["finish_reason"]) != n_comps:
        raise MessageError("inconsistent", f"groups.finish_reason has "
                                           f"{len(c['finish_reason'])} entries, expected {n_comps}")
    if int(c["prompt_len"].sum()) != len(c["prompt_tokens"]):
        raise MessageError("inconsistent", f"prompt lengths do not add up to "
                                           f"{len(c['prompt_tokens'])}")
    n_tokens = len(c["tokens"])
    if len(c["version_lag"]) != n_tokens:
        raise MessageError("inconsistent", f"groups.version_lag has {len(c['version_lag'])} "
                                           f"entries, tokens {n_tokens}")
    if int(c["length"].sum()) != n_tokens or len(c["logprobs"]) != n_tokens:
        raise MessageError("inconsistent", f"completion lengths add up to "
                                           f"{int(c['length'].sum())}, tokens has {n_tokens}, "
                                           f"logprobs {len(c['logprobs'])}")
    # float32 is what the learner computes with: a float64 -1e300 is -inf there.
    with np.errstate(over="ignore"):
        logprobs = c["logprobs"] = c["logprobs"].astype(np.float32, copy=False)
    if n_tokens and not (np.isfinite(logprobs).all() and (logprobs <= 1e-4).all()):
        raise MessageError("bad_logprob", "groups.logprobs not finite or > 0")
    if not np.isfinite(c["reward"]).all():
        raise MessageError("bad_reward", "groups.reward not finite")
    if not np.isfinite(c["created_at"]).all():
        raise MessageError("bad_value", "groups.created_at not finite")
    if not (_within(c["seq"], -1, INT64_MAX - 1) and _within(c["index"], -1, _MAX_LENGTH)):
        raise MessageError("bad_value", "groups.seq or groups.index negative (-1: not stamped)")
    if not _within(c["policy_version"], 0, MAX_VERSION):
        raise MessageError("bad_version", f"groups.policy_version outside [0, {MAX_VERSION}]")
    # A group's policy_version is its oldest token's (what its staleness is judged by): no
    # token is older, and none newer than the bound on versions.
    if not _within(c["version_lag"], 0, 2**31 - 1):
        raise MessageError("bad_version", "groups.version_lag negative: a token older than its "
                                          "group's policy_version")
    starts = np.concatenate([[0], np.cumsum(c["group_size"])[:-1]]).astype(np.int64)
    per_group = (np.add.reduceat(c["length"].astype(np.int64), starts) if n_groups
                 else np.zeros(0, np.int64))
    c["versions"] = np.repeat(c["policy_version"].astype(np.int64), per_group) + c["version_lag"]
    if not _within(c["versions"], 0, MAX_VERSION):
        raise MessageError("bad_version", f"a token's version is outside [0, {MAX_VERSION}]")
    top = 2**31 if vocab_size is None else vocab_size
    for name in ("tokens", "prompt_tokens"):
        if not _within(c[name], 0, top - 1):
            raise MessageError("bad_token", f"groups.{name}: token id outside [0, {top})")
    return c


def _split(a: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Consecutive slices of `a` (views); plain slicing is ~10x cheaper than np.split."""
    ends = np.cumsum(lengths).tolist()
    return [a[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]


def parse_groups(cols: Any, vocab_size: int | None = None) -> list[TrajectoryGroup]:
    """Check the columns of a `groups` field as a whole, then slice them into groups (the
    arrays are read-only views of the frame)."""
    c = _checked_columns(cols, vocab_size)
    length, group_size = c["length"], c["group_size"]
    comps = [Completion(t, lp, r, f, v) for t, lp, r, f, v in zip(
        _split(c["tokens"].astype(np.int32, copy=False), length),
        _split(c["logprobs"], length), c["reward"].tolist(), c["finish_reason"],
        _split(c["versions"], length), strict=True)]
    ends = np.cumsum(group_size).tolist()
    return [TrajectoryGroup(pid, prompt, version, comps[end - size : end], gen, created, inc,
                            seq, index)
            for pid, prompt, version, end, size, gen, created, inc, seq, index in zip(
                c["prompt_id"].tolist(), _split(c["prompt_tokens"].astype(np.int32, copy=False),
                                                c["prompt_len"]),
                c["policy_version"].tolist(), ends, group_size.tolist(), c["generator"],
                c["created_at"].tolist(), c["incarnation"], c["seq"].tolist(),
                c["index"].tolist(), strict=True)]


@dataclass(frozen=True)
class Groups:
    """Group columns (`group_columns`). Decoding checks everything and builds the groups;
    encoding checks the column types only (see the module docstring)."""

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> Any:
        if build:
            return parse_groups(v, vocab_size)
        _typed_columns(v)
        return v


@dataclass(frozen=True)
class IpcHandles:
    """The CUDA IPC handles of a colocated push (asyncrl/sync/ipc.py): one map per packed
    buffer with exactly these fields; [] for a broadcast."""

    FIELDS = {"dtype": Str(16, choices=tuple(WEIGHT_DTYPES)), "numel": Int(0, MAX_TENSOR_DIM),
              "offset": Int(0, MAX_TENSOR_DIM), "device_uuid": Str(MAX_NAME),
              "handle": None, "storage_size": Int(0, MAX_WEIGHT_BYTES),
              "storage_offset": Int(0, MAX_WEIGHT_BYTES), "ref_handle": None,
              "ref_offset": Int(0, INT64_MAX), "event_handle": None, "event_sync": None}

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> list:
        if type(v) is not list or len(v) > len(WEIGHT_DTYPES):
            raise MessageError("bad_value", f"{where} is not a list of <= "
                                            f"{len(WEIGHT_DTYPES)} handles")
        for i, h in enumerate(v):
            if type(h) is not dict or set(h) != set(self.FIELDS):
                raise MessageError("bad_value", f"{where}[{i}] is not a handle map")
            for key, field in self.FIELDS.items():
                x = h[key]
                if field is not None:
                    field.check(x, f"{where}[{i}].{key}", vocab_size, build)
                elif key == "event_sync" and type(x) is not bool:
                    raise MessageError("bad_type", f"{where}[{i}].{key} is not a bool")
                elif key != "event_sync" and (type(x) is not bytes or len(x) > 4096):
                    raise MessageError("bad_type", f"{where}[{i}].{key} is not bytes <= 4096")
        return v


# ---------------------------------------------------------------- the schema

_POLICY_VERSION = Int(0, MAX_VERSION, reason="bad_version")  # every message carries one
_HEADER = ("kind", "schema", "policy_version")
_NAME = Str(MAX_NAME)  # sender names, incarnations, sessions
_REASON = Str(MAX_REASON)

SCHEMA: dict[str, dict[str, Int | Float | Str | TensorSpecs | Groups | IpcHandles]] = {
    "trajectories": {"sender": _NAME, "incarnation": _NAME, "seq": Int(0, INT64_MAX),
                     "groups": Groups()},
    "ack": {"seq": Int(-1, INT64_MAX),  # -1: the frame was too broken to read its seq
            "status": Str(16, ("ok", "busy", "rejected")), "reason": _REASON},
    "batch_request": {"rank": Int(0, MAX_RANKS - 1),
                      "num_groups": Int(1, MAX_GROUPS_PER_REQUEST)},
    "batch": {"status": Str(16, ("ok", "not_ready")), "groups": Groups(),
              "stale_dropped_total": Int(0, INT64_MAX)},
    "generator_hello": {"sender": _NAME, "sync_rank": Int(0, MAX_RANKS - 1),
                        "incarnation": _NAME,  # new per generator process
                        "session": _NAME},  # "" until it has joined one
    "sync_join": {"session": Str(MAX_NAME, nonempty=True), "world_size": Int(2, MAX_RANKS),
                  "token": Str(MAX_NAME, nonempty=True)},  # secret part of the store prefix
    "weights_update": {"session": Str(MAX_NAME, nonempty=True), "tensors": TensorSpecs(),
                       "ipc": IpcHandles(),
                       # both ends split `tensors` into the same buckets from this
                       # (asyncrl/sync/weights.py plan_buckets); two are allocated at each end
                       "bucket_bytes": Int(1, MAX_BUCKET_BYTES)},
    "weights_loaded": {"sender": _NAME, "session": _NAME, "seconds": Float(0.0, 1e9)},
    "shutdown": {"reason": _REASON},
    # policy_version: the version the learner wants evaluated (the one it just pushed).
    "eval_request": {},
    # policy_version: the version the engine held while it evaluated (that of every token).
    "eval_result": {"sender": _NAME, "asked": Int(0, MAX_VERSION, reason="bad_version"),
                    "accuracy": Float(-1e6, 1e6), "problems": Int(0, 2**31 - 1),
                    "seconds": Float(0.0, 1e9)},
    "error": {"reason": _REASON},
    "heartbeat": {"sender": _NAME, "role": Str(16)},
}
KINDS = tuple(SCHEMA)


def _check_fields(kind: str, msg: dict, vocab_size: int | None, build: bool) -> None:
    """Check (and with `build`, convert) every declared field of `msg` in place."""
    if "policy_version" not in msg:
        raise MessageError("missing_field", "policy_version")
    msg["policy_version"] = _POLICY_VERSION.check(msg["policy_version"], "policy_version",
                                                  vocab_size, build)
    fields = SCHEMA[kind]
    for key in msg:  # keys are str or bytes (strict_map_key), so hashable
        if key not in fields and key not in _HEADER:
            raise MessageError("invalid", f"{key!r:.40} is not a field of {kind}")
    for key, field in fields.items():
        if key not in msg:
            raise MessageError("missing_field", key)
        msg[key] = field.check(msg[key], key, vocab_size, build)


# ---------------------------------------------------------------- codec


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def encode(kind: str, policy_version: int, **fields: Any) -> bytes:
    """Build and serialise a message, checked against SCHEMA: a field missing, undeclared, of
    the wrong type or out of its bounds raises ValueError naming it. Groups may be passed as
    TrajectoryGroup objects."""
    declared = SCHEMA.get(kind) if type(kind) is str else None
    if declared is None:
        raise ValueError(f"unknown message kind {kind!r}")
    missing, extra = sorted(set(declared) - set(fields)), sorted(set(fields) - set(declared))
    if missing or extra:
        raise ValueError(f"wire.encode({kind!r}): missing fields {missing}, "
                         f"undeclared fields {extra}")
    groups = fields.get("groups")
    if type(groups) is list and all(isinstance(g, TrajectoryGroup) for g in groups):
        fields["groups"] = group_columns(groups)
    msg = {"kind": kind, "schema": SCHEMA_VERSION, "policy_version": _plain(policy_version),
           **{k: _plain(v) for k, v in fields.items()}}
    try:
        _check_fields(kind, msg, None, build=False)
    except MessageError as e:
        raise ValueError(f"wire.encode({kind!r}): {e}") from None
    return seal(msgpack.packb(msg, default=_default, use_bin_type=True))


def seal(payload: bytes) -> bytes:
    """Prefix a msgpack payload with the magic and its CRC-32."""
    return MAGIC + struct.pack("<I", zlib.crc32(payload)) + payload


def decode(frame: bytes, expect: tuple[str, ...] | None = None,
           vocab_size: int | None = None) -> dict:
    """Parse and validate one frame. Raises MessageError; never anything else.

    With vocab_size, token ids outside [0, vocab_size) are rejected too."""
    if len(frame) > MAX_FRAME_BYTES:
        raise MessageError("too_large", f"{len(frame)} bytes > {MAX_FRAME_BYTES}")
    if len(frame) < 8 or frame[:4] != MAGIC:
        raise MessageError("bad_magic", f"frame does not start with {MAGIC!r}")
    payload = memoryview(frame)[8:]
    if zlib.crc32(payload) != struct.unpack_from("<I", frame, 4)[0]:
        raise MessageError("bad_checksum", f"CRC-32 mismatch over {len(payload)} bytes")
    try:
        msg = msgpack.unpackb(payload, ext_hook=_unpack_array, raw=False, strict_map_key=True)
    except MessageError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack's own errors for bad input are not one
        # documented set (ValueError and its subclasses, StackError for deep nesting,
        # TypeError, RecursionError in the pure-Python fallback): all mean "not msgpack".
        raise MessageError("not_msgpack", f"{type(e).__name__}: {e}"[:200]) from None
    if type(msg) is not dict:
        raise MessageError("not_a_map", f"top level is {_type_name(msg)}")
    kind = msg.get("kind")
    if type(kind) is not str or kind not in SCHEMA:  # the type first: a list is unhashable
        raise MessageError("unknown_kind", f"kind={_brief(kind)}")
    if expect is not None and kind not in expect:
        raise MessageError("unexpected_kind", f"got {kind}, expected one of {expect}")
    schema = msg.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise MessageError("schema_version",
                           f"schema={_brief(schema)}, this build speaks {SCHEMA_VERSION}")
    _check_fields(kind, msg, vocab_size, build=True)
    return msg

"""Every message asyncrl sends over ZeroMQ, its fields, and the msgpack codec.

A frame is `MAGIC | crc32(payload) | payload` (4 + 4 bytes of header, little-endian), where
the payload is one msgpack map with at least `kind`, `schema` (SCHEMA_VERSION) and
`policy_version` (the learner version the sender last knew). The checksum catches corrupted
frames that would otherwise still decode into a valid-looking record. Arrays travel as a msgpack
extension (code 1): dtype, shape and raw little-endian bytes, never Python lists.
Trajectory groups travel as columns: one array per field for all the groups of a message
(`group_columns`), so decoding and checking cost a few numpy calls per message, not several
Python objects per completion.
`decode` validates every field and raises `MessageError` with a short `reason` that the
receiver counts in Prometheus; receivers never crash on a bad frame.

Message kinds (docs/architecture.md has the table with directions and sockets):
  trajectories      generator -> buffer   groups of sampled completions
  ack               buffer -> generator   status ok | busy | rejected
  batch_request     learner -> buffer     ask for num_groups groups usable at policy_version
  batch             buffer -> learner     status ok | not_ready, the groups, drop counters
  generator_hello   generator -> learner  "I am here, in sync session S, holding version v";
                                          sent at start and every net.heartbeat_interval_s
  sync_join         learner -> generator  join weight-sync session S (a fresh store prefix)
  weights_update    learner -> generator  a broadcast of these tensors follows on session S
  weights_loaded    generator -> learner  the new weights are live in the engine
  shutdown          learner -> generator  training finished: exit (status 0)
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

SCHEMA_VERSION = 2  # 2: groups travel as columns (one array per field per message)
MAGIC = b"ARL1"
_ARRAY_EXT = 1
_DTYPES = {"int32", "int64", "float32", "float64", "uint8", "float16"}
_LE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _DTYPES}
MAX_FRAME_BYTES = 256 * 1024 * 1024


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
        raise MessageError("bad_array", f"dtype {dt!r} not allowed")
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


@dataclass
class TrajectoryGroup:
    """The `group_size` completions of one prompt, sampled under one policy version."""

    prompt_id: int
    prompt_tokens: np.ndarray  # (P,) int32
    policy_version: int
    completions: list[Completion]
    generator: str = ""
    created_at: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.completions)


# ---------------------------------------------------------------- validation

_INT = (int,)
_NUM = (int, float)
_STR = (str,)


def _need(msg: dict, key: str, types: tuple, where: str = "") -> Any:
    if key not in msg:
        raise MessageError("missing_field", f"{where}{key}")
    v = msg[key]
    if isinstance(v, bool) or not isinstance(v, types):
        raise MessageError("bad_type", f"{where}{key} is {type(v).__name__}")
    return v


def _need_array(msg: dict, key: str, kinds: str, where: str) -> np.ndarray:
    a = msg.get(key)
    if not isinstance(a, np.ndarray):
        raise MessageError("missing_field" if a is None else "bad_type", f"{where}{key}")
    if a.ndim != 1 or a.dtype.kind not in kinds:
        raise MessageError("bad_array", f"{where}{key} has shape {a.shape} dtype {a.dtype}")
    return a


def _version(msg: dict, key: str = "policy_version", where: str = "") -> int:
    v = _need(msg, key, _INT, where)
    if not 0 <= v < 2**40:
        raise MessageError("bad_version", f"{where}{key}={v}")
    return v


def group_columns(groups: list[TrajectoryGroup]) -> dict:
    """The `groups` field: per group prompt_id, policy_version, created_at, generator,
    prompt_len, group_size; prompt_tokens concatenated; per completion length, reward,
    finish_reason; tokens and logprobs concatenated."""
    comps = [c for g in groups for c in g.completions]

    def cat(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    return {
        "prompt_id": np.array([g.prompt_id for g in groups], np.int64),
        "policy_version": np.array([g.policy_version for g in groups], np.int64),
        "created_at": np.array([g.created_at for g in groups], np.float64),
        "generator": [g.generator for g in groups],
        "prompt_len": np.array([len(g.prompt_tokens) for g in groups], np.int32),
        "prompt_tokens": cat([g.prompt_tokens for g in groups], "int32"),
        "group_size": np.array([len(g.completions) for g in groups], np.int32),
        "length": np.array([len(c.tokens) for c in comps], np.int32),
        "tokens": cat([c.tokens for c in comps], "int32"),
        "logprobs": cat([c.logprobs for c in comps], "float32"),
        "reward": np.array([c.reward for c in comps], np.float64),
        "finish_reason": [c.finish_reason for c in comps],
    }


def _strings(cols: dict, key: str, n: int) -> list[str]:
    v = _need(cols, key, (list,), "groups.")
    if len(v) != n:
        raise MessageError("inconsistent", f"groups.{key} has {len(v)} entries, expected {n}")
    if not all(type(x) is str for x in v):
        raise MessageError("bad_type", f"groups.{key} holds a non-string")
    return v


def _split(a: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Consecutive slices of `a` (views); plain slicing is ~10x cheaper than np.split."""
    ends = np.cumsum(lengths).tolist()
    return [a[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]


def parse_groups(cols: Any, vocab_size: int | None = None) -> list[TrajectoryGroup]:
    """Check the columns of a `groups` field as a whole, then slice them into groups (the
    arrays are read-only views of the frame)."""
    if not isinstance(cols, dict):
        raise MessageError("missing_field" if cols is None else "bad_type",
                           "groups is not a map of columns")
    per_group = {k: _need_array(cols, k, kinds, "groups.") for k, kinds in (
        ("prompt_id", "iu"), ("policy_version", "iu"), ("created_at", "f"), ("prompt_len", "iu"),
        ("group_size", "iu"))}
    n_groups = len(per_group["prompt_id"])
    for k, a in per_group.items():
        if len(a) != n_groups:
            raise MessageError("inconsistent", f"groups.{k} has {len(a)}, prompt_id {n_groups}")
    prompt_len, group_size = per_group["prompt_len"], per_group["group_size"]
    length = _need_array(cols, "length", "iu", "groups.")
    n_comps = len(length)
    reward = _need_array(cols, "reward", "f", "groups.")
    prompts = _need_array(cols, "prompt_tokens", "iu", "groups.")
    tokens = _need_array(cols, "tokens", "iu", "groups.")
    logprobs = _need_array(cols, "logprobs", "f", "groups.")
    if (group_size < 1).any():
        raise MessageError("inconsistent", "a group has no completions")
    if int(group_size.sum()) != n_comps or len(reward) != n_comps:
        raise MessageError("inconsistent", f"group sizes add up to {int(group_size.sum())}, "
                                           f"length has {n_comps}, reward {len(reward)}")
    if (prompt_len < 0).any() or int(prompt_len.sum()) != len(prompts):
        raise MessageError("inconsistent", f"prompt lengths do not add up to {len(prompts)}")
    if (length < 0).any() or int(length.sum()) != len(tokens) or len(logprobs) != len(tokens):
        raise MessageError("inconsistent", f"completion lengths add up to {int(length.sum())}, "
                                           f"tokens has {len(tokens)}, logprobs {len(logprobs)}")
    if len(logprobs) and not (np.isfinite(logprobs).all() and (logprobs <= 1e-4).all()):
        raise MessageError("bad_logprob", "groups.logprobs not finite or > 0")
    if not np.isfinite(reward).all():
        raise MessageError("bad_reward", "groups.reward not finite")
    versions = per_group["policy_version"]
    if len(versions) and not ((versions >= 0).all() and (versions < 2**40).all()):
        raise MessageError("bad_version", "groups.policy_version outside [0, 2**40)")
    top = 2**31 if vocab_size is None else vocab_size
    for name, ids in (("tokens", tokens), ("prompt_tokens", prompts)):
        if len(ids) and (ids.min() < 0 or ids.max() >= top):
            raise MessageError("bad_token", f"groups.{name}: token id outside [0, {top})")
    generators = _strings(cols, "generator", n_groups)
    finish = _strings(cols, "finish_reason", n_comps)
    comps = [Completion(t, lp, r, f) for t, lp, r, f in zip(
        _split(tokens.astype(np.int32, copy=False), length),
        _split(logprobs.astype(np.float32, copy=False), length), reward.tolist(), finish,
        strict=True)]
    ends = np.cumsum(group_size).tolist()
    return [TrajectoryGroup(pid, prompt, version, comps[end - size : end], gen, created)
            for pid, prompt, version, end, size, gen, created in zip(
                per_group["prompt_id"].tolist(), _split(prompts.astype(np.int32, copy=False),
                                                         prompt_len),
                versions.tolist(), ends, group_size.tolist(), generators,
                per_group["created_at"].tolist(), strict=True)]


def _check_trajectories(m: dict, vocab_size: int | None) -> None:
    _need(m, "sender", _STR)
    _need(m, "incarnation", _STR)
    _need(m, "seq", _INT)
    m["groups"] = parse_groups(m.get("groups"), vocab_size)


def _check_ack(m: dict, vocab_size: int | None) -> None:
    _need(m, "seq", _INT)
    if _need(m, "status", _STR) not in ("ok", "busy", "rejected"):
        raise MessageError("bad_value", f"ack status {m['status']!r}")
    _need(m, "reason", _STR)


def _check_batch_request(m: dict, vocab_size: int | None) -> None:
    _need(m, "rank", _INT)
    if _need(m, "num_groups", _INT) <= 0:
        raise MessageError("bad_value", "num_groups must be > 0")


def _check_batch(m: dict, vocab_size: int | None) -> None:
    if _need(m, "status", _STR) not in ("ok", "not_ready"):
        raise MessageError("bad_value", f"batch status {m['status']!r}")
    m["groups"] = parse_groups(m.get("groups"), vocab_size)
    _need(m, "stale_dropped_total", _INT)


def _check_generator_hello(m: dict, vocab_size: int | None) -> None:
    _need(m, "sender", _STR)
    _need(m, "sync_rank", _INT)
    _need(m, "incarnation", _STR)  # new per generator process
    _need(m, "session", _STR)  # "" until it has joined one


def _check_sync_join(m: dict, vocab_size: int | None) -> None:
    if not _need(m, "session", _STR):
        raise MessageError("bad_value", "empty sync session")
    if _need(m, "world_size", _INT) < 2:
        raise MessageError("bad_value", f"sync world_size={m['world_size']}")


def _check_weights_update(m: dict, vocab_size: int | None) -> None:
    _need(m, "session", _STR)
    specs = _need(m, "tensors", (list,))
    for s in specs:
        if not (isinstance(s, list) and len(s) == 3 and isinstance(s[0], str)
                and s[1] in _DTYPES | {"bfloat16"} and isinstance(s[2], list)):
            raise MessageError("bad_value", f"tensor spec {s!r:.80}")


def _check_weights_loaded(m: dict, vocab_size: int | None) -> None:
    _need(m, "sender", _STR)
    _need(m, "session", _STR)
    _need(m, "seconds", _NUM)


def _check_shutdown(m: dict, vocab_size: int | None) -> None:
    _need(m, "reason", _STR)


def _check_error(m: dict, vocab_size: int | None) -> None:
    _need(m, "reason", _STR)


def _check_heartbeat(m: dict, vocab_size: int | None) -> None:
    _need(m, "sender", _STR)
    if len(m["sender"]) > 64:
        raise MessageError("bad_value", "sender name longer than 64 characters")
    _need(m, "role", _STR)


_CHECKS = {
    "trajectories": _check_trajectories,
    "ack": _check_ack,
    "batch_request": _check_batch_request,
    "batch": _check_batch,
    "generator_hello": _check_generator_hello,
    "sync_join": _check_sync_join,
    "weights_update": _check_weights_update,
    "weights_loaded": _check_weights_loaded,
    "shutdown": _check_shutdown,
    "error": _check_error,
    "heartbeat": _check_heartbeat,
}
KINDS = tuple(_CHECKS)


# ---------------------------------------------------------------- codec


def encode(kind: str, policy_version: int, **fields: Any) -> bytes:
    """Build and serialise a message. Groups may be passed as TrajectoryGroup objects."""
    if kind not in _CHECKS:
        raise ValueError(f"unknown message kind {kind!r}")
    if isinstance(fields.get("groups"), list):
        fields["groups"] = group_columns(fields["groups"])
    msg = {"kind": kind, "schema": SCHEMA_VERSION, "policy_version": policy_version, **fields}
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
    except Exception as e:  # msgpack raises many types for garbage input
        raise MessageError("not_msgpack", f"{type(e).__name__}: {e}"[:200]) from None
    if not isinstance(msg, dict):
        raise MessageError("not_a_map", f"top level is {type(msg).__name__}")
    kind = msg.get("kind")
    if kind not in _CHECKS:
        raise MessageError("unknown_kind", f"kind={kind!r:.40}")
    if expect is not None and kind not in expect:
        raise MessageError("unexpected_kind", f"got {kind}, expected one of {expect}")
    if msg.get("schema") != SCHEMA_VERSION:
        raise MessageError("schema_version",
                           f"schema={msg.get('schema')!r:.20}, this build speaks {SCHEMA_VERSION}")
    _version(msg)
    try:
        _CHECKS[kind](msg, vocab_size)
    except MessageError:
        raise
    except Exception as e:  # defensive: a checker bug must not kill a receiver
        raise MessageError("invalid", f"{type(e).__name__}: {e}"[:200]) from None
    return msg

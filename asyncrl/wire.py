"""Every message asyncrl sends over ZeroMQ, its fields, and the msgpack codec.

A frame is `MAGIC | crc32(payload) | payload` (4 + 4 bytes of header, little-endian), where
the payload is one msgpack map with at least `kind`, `schema` (SCHEMA_VERSION) and
`policy_version` (the learner version the sender last knew). The checksum catches corrupted
frames that would otherwise still decode into a valid-looking record. Arrays travel as a msgpack
extension (code 1): dtype, shape and raw little-endian bytes, never Python lists.
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

SCHEMA_VERSION = 1
MAGIC = b"ARL1"
_ARRAY_EXT = 1
_DTYPES = {"int32", "int64", "float32", "float64", "uint8", "float16"}
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
    if dt not in _DTYPES:
        raise MessageError("bad_array", f"dtype {dt!r} not allowed")
    dtype = np.dtype(dt).newbyteorder("<")
    expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - off != expect:
        raise MessageError("bad_array", f"{len(data) - off} data bytes for shape {shape} {dt}")
    return np.frombuffer(data, dtype=dtype, offset=off).reshape(shape)


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

    def to_wire(self) -> dict:
        return {"tokens": self.tokens, "logprobs": self.logprobs, "reward": self.reward,
                "finish_reason": self.finish_reason}


@dataclass
class TrajectoryGroup:
    """The `group_size` completions of one prompt, sampled under one policy version."""

    prompt_id: int
    prompt_tokens: np.ndarray  # (P,) int32
    policy_version: int
    completions: list[Completion]
    generator: str = ""
    created_at: float = 0.0

    def to_wire(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt_tokens": self.prompt_tokens,
                "policy_version": self.policy_version, "generator": self.generator,
                "created_at": self.created_at,
                "completions": [c.to_wire() for c in self.completions]}

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


def parse_group(g: Any, vocab_size: int | None = None) -> TrajectoryGroup:
    if not isinstance(g, dict):
        raise MessageError("bad_type", "group is not a map")
    prompt = _need_array(g, "prompt_tokens", "iu", "group.")
    comps_raw = _need(g, "completions", (list,), "group.")
    if not comps_raw:
        raise MessageError("inconsistent", "group has no completions")
    comps = []
    for i, c in enumerate(comps_raw):
        w = f"completions[{i}]."
        if not isinstance(c, dict):
            raise MessageError("bad_type", f"{w[:-1]} is not a map")
        toks = _need_array(c, "tokens", "iu", w)
        lps = _need_array(c, "logprobs", "f", w)
        if len(toks) != len(lps):
            raise MessageError("inconsistent", f"{w}tokens has {len(toks)}, logprobs {len(lps)}")
        if len(lps) and not (np.isfinite(lps).all() and (lps <= 1e-4).all()):
            raise MessageError("bad_logprob", f"{w}logprobs not finite or > 0")
        reward = _need(c, "reward", _NUM, w)
        if not math.isfinite(reward):
            raise MessageError("bad_reward", f"{w}reward={reward}")
        if vocab_size is not None and len(toks) and (toks.min() < 0 or toks.max() >= vocab_size):
            raise MessageError("bad_token", f"{w}token id outside [0, {vocab_size})")
        comps.append(Completion(toks.astype(np.int32), lps.astype(np.float32), float(reward),
                                _need(c, "finish_reason", _STR, w)))
    if vocab_size is not None and len(prompt) and (prompt.min() < 0 or prompt.max() >= vocab_size):
        raise MessageError("bad_token", "group.prompt_tokens outside the vocabulary")
    return TrajectoryGroup(
        prompt_id=_need(g, "prompt_id", _INT, "group."),
        prompt_tokens=prompt.astype(np.int32),
        policy_version=_version(g, where="group."),
        completions=comps,
        generator=_need(g, "generator", _STR, "group."),
        created_at=float(_need(g, "created_at", _NUM, "group.")),
    )


def _check_trajectories(m: dict, vocab_size: int | None) -> None:
    _need(m, "sender", _STR)
    _need(m, "incarnation", _STR)
    _need(m, "seq", _INT)
    groups = _need(m, "groups", (list,))
    m["groups"] = [parse_group(g, vocab_size) for g in groups]


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
    m["groups"] = [parse_group(g, vocab_size) for g in _need(m, "groups", (list,))]
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
    if "groups" in fields:
        fields["groups"] = [g.to_wire() if isinstance(g, TrajectoryGroup) else g
                            for g in fields["groups"]]
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

"""The codec: frames (magic, CRC-32, msgpack), arrays as a msgpack extension, and the checks
of `encode` and `decode` against the message classes of asyncrl/wire/messages.py."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import msgpack
import numpy as np

from asyncrl.wire.fields import MessageError, _brief, _type_name
from asyncrl.wire.groups import TrajectoryGroup, group_columns
from asyncrl.wire.messages import MESSAGES, SCHEMA, VERSION, Message

# The wire format's version: groups travel as columns (one array per field per message),
# each group with its identity (incarnation, seq, index; asyncrl/buffer/journal.py) and each
# token with the policy version that sampled it (`version_lag`: the version minus its group's
# policy_version, which is the group's oldest token's) and its source (`sources`: sampled by
# the policy, or injected by an environment), each completion with the parts of its reward
# (`reward_part_names`, `reward_parts`); weights_update says its bucket_bytes and whether it
# is a LoRA adapter (`adapter`); a completion may be a separate sample of one of its group's
# episodes (`sample_of`). A frame of any other version is refused (`schema_version`), never
# misread.
SCHEMA_VERSION = 8
MAGIC = b"ARL1"
_ARRAY_EXT = 1
_DTYPES = {"int32", "int64", "float32", "float64", "uint8", "float16"}
_LE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _DTYPES}
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_ARRAY_DIMS = 8  # group columns are 1-D; nothing else travels as an array


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


# ---------------------------------------------------------------- checks

_HEADER = ("kind", "schema", "policy_version")


def _check_fields(kind: str, msg: dict, vocab_size: int | None, build: bool) -> None:
    """Check (and with `build`, convert) every declared field of `msg` in place."""
    if "policy_version" not in msg:
        raise MessageError("missing_field", "policy_version")
    msg["policy_version"] = VERSION.check(msg["policy_version"], "policy_version", vocab_size,
                                          build)
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
           vocab_size: int | None = None) -> Message:
    """Parse and validate one frame into its message object (asyncrl/wire/messages.py).
    Raises MessageError; never anything else.

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
    del msg["kind"], msg["schema"]
    return MESSAGES[kind](**msg)

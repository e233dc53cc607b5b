"""Hypothesis strategies for hostile wire frames: correctly sealed frames whose maps are well
formed except for what hypothesis puts in them, so they reach the field checks. Used by
tests/unit/test_wire_fuzz.py (the codec) and tests/e2e/test_port_fuzz.py (every port)."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncrl import wire
from asyncrl.testing import make_groups

VOCAB = 300


# ---------------------------------------------------------------- packing anything


class Raw(bytes):
    """msgpack bytes spliced in as they are: what msgpack.packb refuses to build (negative
    extension codes, nesting deeper than its recursion limit, int map keys in a str map)."""


def pack(v) -> bytes:
    """msgpack bytes for `v`; numpy arrays as the wire's array extension."""
    if isinstance(v, Raw):
        return bytes(v)
    if type(v) is list and len(v) > 64:  # long lists of plain values: msgpack's own speed
        try:
            return msgpack.packb(v, use_bin_type=True)
        except TypeError:  # holds an array or a Raw
            pass
    if isinstance(v, dict):
        n = len(v)
        head = (bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n) if n < 2**16
                else b"\xdf" + struct.pack(">I", n))
        return head + b"".join(pack(k) + pack(x) for k, x in v.items())
    if isinstance(v, list):
        n = len(v)
        head = (bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 2**16
                else b"\xdd" + struct.pack(">I", n))
        return head + b"".join(pack(x) for x in v)
    return msgpack.packb(v, default=wire._default, use_bin_type=True)


def frame_of(msg) -> bytes:
    return wire.seal(pack(msg))


def _ext(code: int, data: bytes) -> Raw:
    return Raw(b"\xc7" + bytes([len(data)]) + struct.pack("b", code) + data)


def _array_ext(dtype: bytes, shape: tuple[int, ...], data: bytes) -> Raw:
    head = bytes([len(dtype)]) + dtype + bytes([len(shape)]) + b"".join(
        struct.pack("<I", s) for s in shape)
    body = head + data
    return Raw(b"\xc9" + struct.pack(">I", len(body)) + struct.pack("b", 1) + body)


# ---------------------------------------------------------------- hostile values

EDGE_INTS = [0, 1, -1, 2, 2**7, 2**8, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**40 - 1, 2**40,
             2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63)]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e300, 5e-324, 1e-4, 0.5, -101.0]
NP_DTYPES = ["int32", "int64", "uint8", "float16", "float32", "float64"]

deep_nesting = st.sampled_from([50, 500, 1000, 1100, 5000, 100_000]).flatmap(
    lambda d: st.sampled_from([Raw(b"\x91" * d + b"\xc0"),  # [[[...nil...]]]
                               Raw(b"\x81\xa1k" * d + b"\xc0"),  # {"k": {"k": ...}}
                               Raw(b"\x91" * d)]))  # and cut short
huge_strings = st.sampled_from([65, 513, 1025, 100_000, 1_000_000]).map(lambda n: "x" * n)
unknown_exts = st.builds(_ext, st.integers(-128, 127).filter(lambda c: c != 1),
                         st.binary(max_size=24))
bad_array_exts = st.one_of(
    st.builds(_array_ext, st.sampled_from([b"int32", b"float32", b"complex128", b"object",
                                           b"\xff\xfe", b""]),
              st.lists(st.sampled_from([0, 1, 3, 2**31, 2**32 - 1]), max_size=12).map(tuple),
              st.binary(max_size=32)),
    st.builds(lambda d: _ext(1, d), st.binary(max_size=12)))  # truncated headers
np_arrays = hnp.arrays(st.sampled_from(NP_DTYPES),
                       hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EDGE_FLOATS),
    st.text(max_size=12), st.sampled_from(["", "ok", "stop", "float32", "trajectories"]),
    st.binary(max_size=24), unknown_exts, bad_array_exts, np_arrays)
containers = st.recursive(
    scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.binary(max_size=4)), inner, max_size=4),
        st.dictionaries(st.integers(-5, 5), inner, min_size=1, max_size=2)),  # int keys
    max_leaves=8)
long_lists = st.sampled_from([1000, 100_000]).map(  # packed here: pack() is per element
    lambda n: Raw(b"\xdd" + struct.pack(">I", n) + b"\x00" * n))
hostile = st.one_of(scalars, containers, huge_strings, deep_nesting, long_lists)


# ---------------------------------------------------------------- valid templates


def _group(version=3, n=2, T=4) -> wire.TrajectoryGroup:
    """A valid group: n completions of T tokens after a prompt of 3, seeded by `version`."""
    return make_groups(1, n, rng=version, vocab_size=VOCAB, prompt_len=3, completion_len=T,
                       policy_version=version, finish_reason="stop", created_at=123.5)[0]


def columns() -> dict:
    return wire.group_columns([_group(), _group(version=4)])


def specs() -> list:
    return [["w", "float32", [2, 3]], ["b", "bfloat16", [3]]]


def template(kind: str) -> dict:
    """Valid fields of each kind (what the roles send)."""
    return {
        "trajectories": lambda: dict(sender="gen0", incarnation="ab12", seq=9, groups=columns()),
        "ack": lambda: dict(seq=1, status="busy", reason="full"),
        "batch_request": lambda: dict(rank=0, num_groups=4),
        "batch": lambda: dict(status="ok", groups=columns(), stale_dropped_total=5),
        "generator_hello": lambda: dict(sender="gen0", sync_rank=1, incarnation="i", session=""),
        "sync_join": lambda: dict(session="s.1", world_size=2, token="t"),
        "weights_update": lambda: dict(session="s.1", tensors=specs(), ipc=[],
                                      bucket_bytes=1 << 20, adapter={}),
        "weights_loaded": lambda: dict(sender="gen0", session="s.1", seconds=0.5),
        "shutdown": lambda: dict(reason="done"),
        "error": lambda: dict(reason="x"),
        "heartbeat": lambda: dict(sender="gen0", role="generator"),
        "eval_request": lambda: dict(),
        "eval_result": lambda: dict(sender="gen0", asked=1, accuracy=0.5, problems=8,
                                    seconds=0.1),
        "score_request": lambda: dict(sender="gen0", incarnation="ab12", seq=3,
                                      prompts=["07+45=", "07+45="], completions=["52", "42"]),
        "scores": lambda: dict(seq=3, status="ok", reason="", scores=[0.5, -1.25]),
    }[kind]()


def valid_message(kind: str, policy_version: int = 1) -> dict:
    return {"kind": kind, "schema": wire.SCHEMA_VERSION, "policy_version": policy_version,
            **template(kind)}


# ---------------------------------------------------------------- valid values, from SCHEMA


@st.composite
def valid_group(draw) -> wire.TrajectoryGroup:
    def values(elements, n: int) -> list:
        return draw(st.lists(elements, min_size=n, max_size=n))

    lengths = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    prompt_id = draw(st.integers(-(2**63), 2**63 - 1))
    prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))
    version = draw(st.integers(0, wire.MAX_VERSION))
    comps = [(values(st.integers(0, VOCAB - 1), n), values(st.floats(-30, 0, width=32), n),
              draw(st.floats(-1e6, 1e6)), draw(st.sampled_from(["stop", "length", "abort"])))
             for n in lengths]
    tokens, logprobs, rewards, finish = ([list(x)] for x in zip(*comps))
    return make_groups(1, len(lengths), first_prompt_id=prompt_id, prompts=[prompt],
                       tokens=tokens, logprobs=logprobs, rewards=rewards, finish_reason=finish,
                       policy_version=version, generator=draw(st.text(max_size=wire.MAX_NAME)),
                       created_at=draw(st.floats(0, 2e9)))[0]


def in_bounds(field) -> st.SearchStrategy:
    """Any value the schema allows for this field, its edges included."""
    if isinstance(field, wire.Int):
        return st.one_of(st.integers(field.lo, field.hi), st.sampled_from([field.lo, field.hi]))
    if isinstance(field, wire.Float):
        return st.floats(field.lo, field.hi)
    if isinstance(field, wire.Str):
        if field.choices:
            return st.sampled_from(field.choices)
        return st.one_of(st.text(min_size=int(field.nonempty), max_size=12),
                         st.just("é" * field.max_len))
    if isinstance(field, wire.TensorSpecs):
        spec = st.tuples(st.text(min_size=1, max_size=8), st.sampled_from(list(wire.WEIGHT_DTYPES)),
                         st.lists(st.integers(0, 64), max_size=3)).map(list)
        return st.lists(spec, max_size=4, unique_by=lambda s: s[0])
    if isinstance(field, wire.IpcHandles):
        handle = st.fixed_dictionaries({
            k: (in_bounds(f) if f is not None else
                st.booleans() if k == "event_sync" else st.binary(max_size=64))
            for k, f in wire.IpcHandles.FIELDS.items()})
        return st.lists(handle, max_size=2)
    if isinstance(field, wire.AdapterSpec):
        return st.one_of(st.just({}), st.fixed_dictionaries({
            "r": st.sampled_from(wire.AdapterSpec.RANKS),
            "lora_alpha": st.floats(1e-9, 1e6),
            "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "down_proj"]),
                                       min_size=1, max_size=3)}))
    if isinstance(field, wire.Texts):
        return st.lists(st.one_of(st.text(max_size=12), st.just("é" * 300)), max_size=4)
    if isinstance(field, wire.Floats):
        return st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4)
    assert isinstance(field, wire.Groups)
    return st.lists(valid_group(), max_size=3).map(wire.group_columns)


def random_valid_message(kind: str) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({
        "kind": st.just(kind), "schema": st.just(wire.SCHEMA_VERSION),
        "policy_version": in_bounds(wire.Int(0, wire.MAX_VERSION)),
        **{key: in_bounds(field) for key, field in wire.SCHEMA[kind].items()}})


# ---------------------------------------------------------------- hostile column edits

_N = {"group": ["prompt_id", "policy_version", "created_at", "prompt_len", "group_size"],
      "comp": ["length", "reward"], "flat": ["prompt_tokens", "tokens", "logprobs"]}
ARRAY_COLUMNS = [c for cs in _N.values() for c in cs]


def _targeted() -> list:
    """Edits that are easy to get wrong in a checker: sums that wrap around, float64 values
    that overflow float32, ids at the vocabulary's edge, counts off by one."""
    c = columns()
    wrap = np.array([2**62, 2**62, 2**62, 2**62 + 8], np.int64)  # sums to 8 modulo 2**64
    return [
        ("length", wrap), ("prompt_len", np.array([2**63 - 1, 2**63 - 1], np.int64)),
        ("group_size", np.array([2**32 + 2, 2], np.int64)), ("group_size", np.array([0, 4])),
        ("length", np.array([-4, 12, 4, 4], np.int64)), ("length", np.array([8, 0, 4, 4])),
        ("logprobs", np.full(16, -1e300)), ("logprobs", np.full(16, 0.5)),
        ("logprobs", np.full(16, np.nan, np.float32)), ("reward", np.array([np.inf] * 4)),
        ("created_at", np.array([np.nan, 0.0])), ("policy_version", np.array([-1, 2**40])),
        ("tokens", np.full(16, VOCAB, np.int64)), ("tokens", np.full(16, 2**40, np.int64)),
        ("tokens", np.full(16, -1, np.int32)), ("prompt_tokens", np.full(6, 2**31, np.int64)),
        ("tokens", c["tokens"].astype(np.float32)), ("tokens", c["tokens"].reshape(4, 4)),
        ("tokens", c["tokens"][:-1]), ("reward", c["reward"][:-1]),
        ("prompt_id", c["prompt_id"][:1]), ("logprobs", c["logprobs"].astype(np.float16)),
        ("generator", ["gen0"]), ("generator", ["gen0", "x" * 65]),
        ("finish_reason", ["stop"] * 3), ("finish_reason", ["stop", 1, "stop", "stop"]),
    ]


_TARGETED = _targeted()


@st.composite
def column_edit(draw, cols: dict) -> None:
    """Replace (or drop) one column of `cols` in place."""
    how = draw(st.sampled_from(["targeted"] * 3 + ["array", "value", "drop"]))
    if how == "targeted":
        key, value = draw(st.sampled_from(_TARGETED))
        cols[key] = value
        return
    key = draw(st.sampled_from(sorted(cols, key=repr)))  # an earlier edit may add a bytes key
    if how == "drop":
        del cols[key]
    elif how == "array":  # any dtype, rank and length, extreme values included
        cols[key] = draw(hnp.arrays(st.sampled_from(NP_DTYPES), st.integers(0, 20)))
    else:
        cols[key] = draw(hostile)


@st.composite
def spec_edit(draw, tensors: list) -> None:
    """Spoil one tensor spec of a weights_update in place."""
    how = draw(st.sampled_from(["element", "spec", "huge", "many", "dims"]))
    i = draw(st.integers(0, len(tensors) - 1))
    if how == "element":
        tensors[i][draw(st.integers(0, 2))] = draw(hostile)
    elif how == "spec":
        tensors[i] = draw(hostile)
    elif how == "huge":  # fits every per-dimension bound, describes 10**12 elements or more
        tensors[i][2] = draw(st.sampled_from([[10**6, 10**6], [2**40, 2**40], [2**40] * 8,
                                              [2**31] * 3]))
    elif how == "many":  # (the bound itself is pinned below: 1 s to unpack)
        n = draw(st.sampled_from([10, 2000]))
        tensors.extend([f"t{j}", "float32", [1]] for j in range(n))
    else:
        tensors[i][2] = draw(st.lists(st.sampled_from([0, 1, -1, 2**40 + 1]), max_size=12))


@st.composite
def hostile_message(draw, kind: str) -> dict:
    """A valid message of `kind` with one to three of its fields, columns or specs spoiled:
    replaced by a value of any msgpack type, dropped, or joined by an undeclared field."""
    msg = valid_message(kind)
    for _ in range(draw(st.integers(1, 3))):
        where = ["field", "drop", "add", "header", "in_bounds", "in_bounds"]
        if "groups" in msg and type(msg["groups"]) is dict:
            where += ["column"] * 4
        if type(msg.get("tensors")) is list and msg["tensors"] and all(
                type(s) is list and len(s) == 3 for s in msg["tensors"]):
            where += ["spec"] * 4
        how = draw(st.sampled_from(where))
        keys = sorted(k for k in msg if k not in ("kind", "schema", "policy_version"))
        if how == "column":
            draw(column_edit(msg["groups"]))
        elif how == "spec":
            draw(spec_edit(msg["tensors"]))
        elif how == "header":
            msg[draw(st.sampled_from(["kind", "schema", "policy_version"]))] = draw(st.one_of(
                hostile, st.sampled_from(list(wire.KINDS))))
        elif how == "in_bounds" and keys:  # a valid value, maybe an extreme one
            key = draw(st.sampled_from(keys))
            if key in wire.SCHEMA[kind]:
                msg[key] = draw(in_bounds(wire.SCHEMA[kind][key]))
        elif how == "add":
            msg[draw(st.text(max_size=8))] = draw(hostile)
        elif keys and how == "drop":
            del msg[draw(st.sampled_from(keys))]
        elif keys:
            msg[draw(st.sampled_from(keys))] = draw(hostile)
    return msg


def hostile_frames(kind: str) -> st.SearchStrategy[bytes]:
    """Correctly sealed frames: 6 in 10 a spoiled message of `kind`, 1 a valid one with random
    values, 2 a spoiled message of any kind, 1 any value at all as the payload (deep nesting
    included)."""
    def frames(branch: int) -> st.SearchStrategy:
        if branch < 6:
            return hostile_message(kind)
        if branch < 7:
            return random_valid_message(kind)
        if branch < 9:
            return st.sampled_from(wire.KINDS).flatmap(hostile_message)
        return hostile
    return st.integers(0, 9).flatmap(frames).map(frame_of)

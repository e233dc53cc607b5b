"""Structure-aware fuzzing of the codec: correctly sealed frames whose maps are well formed
except for what hypothesis puts in them, so they reach the field checks (byte flips almost never
get past the CRC). `wire.decode` raises only MessageError whatever the map holds, what it
accepts `encode` accepts too, and `encode` refuses a bad field naming it.

The strategies live in tests/helpers/fuzz.py, shared with tests/e2e/test_port_fuzz.py, which
sends such frames to every port of every role.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from asyncrl import wire
from tests.conftest import ROOT
from tests.helpers.fuzz import (
    VOCAB,
    Raw,
    _group,
    frame_of,
    hostile,
    hostile_frames,
    template,
    valid_message,
)

# hypothesis warns when it prints a strategy holding a 1 MB string; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

FUZZ = settings(max_examples=150, deadline=5000, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


# ---------------------------------------------------------------- properties


def decode_or_reason(frame: bytes, **kw) -> wire.Message | str:
    """The decoded message, or the reason of the MessageError; anything else fails the test."""
    try:
        return wire.decode(frame, **kw)
    except wire.MessageError as e:
        return e.reason


def _reencoded(msg: wire.Message) -> bytes:
    fields = {k: getattr(msg, k) for k in wire.SCHEMA[msg.kind]}
    return wire.encode(msg.kind, msg.policy_version, **fields)


@pytest.mark.parametrize("kind", wire.KINDS)
@FUZZ
@given(data=st.data())
def test_decode_raises_only_message_error_and_what_it_accepts_encode_accepts(kind, data):
    frame = data.draw(hostile_frames(kind))
    for kw in ({}, {"vocab_size": VOCAB}, {"expect": (kind,)}):
        got = decode_or_reason(frame, **kw)
        if isinstance(got, str):
            continue
        assert got.kind in wire.KINDS
        again = wire.decode(_reencoded(got), **kw)  # what decode accepts is a valid message
        assert again.kind == got.kind and again.policy_version == got.policy_version


@pytest.mark.parametrize("kind", [k for k in wire.KINDS if wire.SCHEMA[k]])  # a field to spoil
@FUZZ
@given(data=st.data())
def test_encode_refuses_a_bad_field_naming_it(kind, data):
    fields = template(kind)
    key = data.draw(st.sampled_from(sorted(fields)))
    fields[key] = data.draw(hostile)
    try:
        frame = wire.encode(kind, 1, **fields)
    except ValueError as e:
        assert key in str(e)
        return
    # Accepted: then a receiver accepts it too (the groups' values are the receiver's check).
    got = decode_or_reason(frame)
    assert isinstance(got, wire.Message) or key == "groups", got


# ---------------------------------------------------------------- the cases found, pinned


def _reason(msg) -> str:
    got = decode_or_reason(frame_of(msg), vocab_size=VOCAB)
    assert isinstance(got, str), "accepted"
    return got


@pytest.mark.parametrize("kind_value", [["trajectories"], {"a": 1}, np.zeros(3), 1.5, None])
def test_an_unhashable_or_odd_kind_is_an_unknown_kind(kind_value):
    assert _reason({**valid_message("ack"), "kind": kind_value}) == "unknown_kind"


@pytest.mark.parametrize("schema", [np.array([2, 2]), [2], True, 2.0, "2"])
def test_a_schema_that_only_looks_like_two_is_refused(schema):
    assert _reason({**valid_message("ack"), "schema": schema}) == "schema_version"


@pytest.mark.parametrize("depth", [1100, 100_000])
def test_deep_nesting_is_not_msgpack(depth):
    nested = Raw(b"\x91" * depth + b"\xc0")
    assert _reason({**valid_message("error"), "reason": nested}) == "not_msgpack"
    assert isinstance(decode_or_reason(wire.seal(bytes(nested))), str)


def test_nesting_that_msgpack_accepts_does_not_reach_repr():
    nested = Raw(b"\x91" * 900 + b"\xc0")  # within msgpack's limit, beyond repr's
    for key in ("kind", "schema", "policy_version", "reason"):
        assert _reason({**valid_message("error"), key: nested}) in {
            "unknown_kind", "schema_version", "bad_type"}


@pytest.mark.parametrize("key,value,reason", [
    ("length", np.array([2**62, 2**62, 2**62, 2**62 + 8], np.int64), "inconsistent"),
    ("group_size", np.array([2**32 + 2, 2], np.int64), "inconsistent"),
    ("logprobs", np.full(16, -1e300), "bad_logprob"),  # -inf in float32
    ("created_at", np.array([np.nan, 0.0]), "bad_value"),
    ("tokens", np.full(16, VOCAB, np.int64), "bad_token"),
])
def test_column_values_are_bounded_before_they_are_summed_or_narrowed(key, value, reason):
    msg = valid_message("trajectories")
    msg["groups"][key] = value
    assert _reason(msg) == reason


@pytest.mark.parametrize("spec,reason", [
    (["w", ["float32"], [2]], "bad_type"),  # was: unhashable dtype -> TypeError
    (["w", "int64", [2]], "bad_value"),  # sync/weights.py cannot allocate it
    (["w", "float32", [10**6, 10**6]], "bad_value"),  # 4 TB
    (["w", "float32", [-1]], "bad_value"),
    (["w", "float32", [1] * 9], "bad_value"),
    (["", "float32", [1]], "bad_value"),
    ("w", "bad_value"),
])
def test_tensor_specs_are_checked_piece_by_piece(spec, reason):
    msg = valid_message("weights_update")
    msg["tensors"] = [spec]
    assert _reason(msg) == reason


def test_as_many_tensors_as_the_bound_and_not_one_more():
    msg = valid_message("weights_update")
    msg["tensors"] = [[f"t{j}", "float16", [2, 2]] for j in range(wire.MAX_TENSORS)]
    assert len(wire.decode(frame_of(msg)).tensors) == wire.MAX_TENSORS
    msg["tensors"].append(["one more", "float16", [1]])
    assert _reason(msg) == "bad_value"


def test_twice_the_same_tensor_is_refused():
    msg = valid_message("weights_update")
    msg["tensors"] = [["w", "float32", [1]], ["w", "float32", [1]]]
    assert _reason(msg) == "bad_value"


def test_an_undeclared_field_is_refused_both_ways():
    assert _reason({**valid_message("ack"), "extra": 1}) == "invalid"
    with pytest.raises(ValueError, match="undeclared fields \\['extra'\\]"):
        wire.encode("ack", 0, seq=1, status="ok", reason="", extra=1)
    with pytest.raises(ValueError, match="missing fields \\['reason'\\]"):
        wire.encode("ack", 0, seq=1, status="ok")


@pytest.mark.parametrize("kind,fields,named", [
    ("trajectories", dict(sender="g", incarnation="i", seq=-1, groups=[_group()]), "seq"),
    ("heartbeat", dict(sender="x" * 65, role="generator"), "sender"),
    ("batch_request", dict(rank=0, num_groups=0), "num_groups"),
    ("batch_request", dict(rank=0, num_groups=True), "num_groups"),
    ("sync_join", dict(session="", world_size=2, token="t"), "session"),
    ("weights_update", dict(session="s", tensors=[["w", "int64", [2]]], ipc=[], bucket_bytes=64, adapter={}), "tensors[0].dtype"),
    ("weights_loaded", dict(sender="g", session="s", seconds=math.nan), "seconds"),
    ("ack", dict(seq=1, status="maybe", reason=""), "status"),
])
def test_a_sender_bug_fails_at_the_sender(kind, fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        wire.encode(kind, 0, **fields)


def test_numpy_scalars_are_plain_numbers_on_the_wire():
    frame = wire.encode("ack", np.int64(3), seq=np.int32(1), status="ok", reason="")
    assert wire.decode(frame).policy_version == 3


def test_the_architecture_table_lists_the_declared_fields():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for kind, fields in wire.SCHEMA.items():
        row = re.search(rf"^\| `{kind}` \|[^|]*\|(.*)\|$", text, re.M)
        assert row, f"docs/architecture.md has no row for {kind}"
        named = set(re.findall(r"`(\w+)`", row.group(1))) - {"policy_version"}
        assert named == set(fields), kind

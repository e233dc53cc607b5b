import dataclasses
import math

import msgpack
import numpy as np
import pytest

from asyncrl import wire


def _group(version=3, n=2, T=4):
    comps = [wire.Completion(np.arange(T, dtype=np.int32) + i, -np.linspace(0.1, 2, T).astype(np.float32),
                             float(i % 2), "stop") for i in range(n)]
    return wire.TrajectoryGroup(prompt_id=7, prompt_tokens=np.array([1, 2, 3], np.int32),
                                policy_version=version, completions=comps, generator="gen0",
                                created_at=123.5)


def test_round_trip_keeps_every_field_and_array_bytes():
    g = _group()
    msg = wire.decode(wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=9, groups=[g]))
    assert (msg.kind, msg.policy_version, msg.sender, msg.seq) == ("trajectories", 3, "gen0", 9)
    out = msg.groups[0]
    assert out.prompt_id == 7 and out.policy_version == 3 and out.created_at == 123.5
    np.testing.assert_array_equal(out.prompt_tokens, g.prompt_tokens)
    for a, b in zip(out.completions, g.completions):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert a.logprobs.dtype == np.float32
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert (a.reward, a.finish_reason) == (b.reward, b.finish_reason)


def test_groups_travel_as_a_few_raw_byte_columns_not_lists():
    groups = [_group(T=1000, n=8) for _ in range(4)]
    frame = wire.encode("trajectories", 0, sender="g", incarnation="a", seq=1, groups=groups)
    raw = msgpack.unpackb(frame[8:], raw=False)  # no ext_hook: arrays stay opaque extension objects
    columns = raw["groups"]
    arrays = {k for k, v in columns.items() if isinstance(v, msgpack.ExtType)}
    # One array per field for the whole message, however many groups and completions.
    assert arrays == {"prompt_id", "policy_version", "created_at", "prompt_len", "prompt_tokens",
                      "group_size", "length", "tokens", "logprobs", "reward", "seq", "index", "version_lag",
                      "reward_parts", "sources", "sample_of"}
    assert len(columns["tokens"].data) >= 4 * 1000 * 8 * 4
    assert columns["finish_reason"] == ["stop", "stop"] * 16
    decoded = wire.decode(frame).groups
    assert [len(g.completions) for g in decoded] == [8, 8, 8, 8]
    assert decoded[3].completions[7].tokens[0] == 7 and len(decoded[3].completions[7].tokens) == 1000


def test_every_kind_round_trips():
    cases = {
        "ack": dict(seq=1, status="busy", reason="full"),
        "batch_request": dict(rank=0, num_groups=4),
        "batch": dict(status="ok", groups=[_group()], stale_dropped_total=5),
        "generator_hello": dict(sender="gen0", sync_rank=1, incarnation="i", session=""),
        "sync_join": dict(session="s.1", world_size=2, token="t"),
        "weights_update": dict(session="s.1", tensors=[["w", "float32", [2, 3]]], ipc=[],
                               bucket_bytes=1 << 20, adapter={}),
        "weights_loaded": dict(sender="gen0", session="s.1", seconds=0.5),
        "shutdown": dict(reason="done"),
        "error": dict(reason="x"),
        "heartbeat": dict(sender="gen0", role="generator"),
        "eval_request": dict(),
        "eval_result": dict(sender="gen0", asked=2, accuracy=0.75, problems=512, seconds=0.4),
        "score_request": dict(sender="gen0", incarnation="i", seq=4, prompts=["1+1=", "é"],
                              completions=["2", ""]),
        "scores": dict(seq=4, status="ok", reason="", scores=[0.25, -3.0]),
    }
    for kind, fields in cases.items():
        msg = wire.decode(wire.encode(kind, 2, **fields))
        assert type(msg) is wire.MESSAGES[kind] and msg.kind == kind and msg.policy_version == 2
        got = {k: v for k, v in msg.as_dict().items() if k not in ("kind", "policy_version")}
        if kind != "batch":  # its groups come back as TrajectoryGroups
            assert got == fields, kind
    assert set(cases) | {"trajectories"} == set(wire.KINDS)


def test_receivers_get_typed_messages_with_only_the_declared_fields():
    ack = wire.decode(wire.encode("ack", 3, seq=7, status="ok", reason=""))
    assert isinstance(ack, wire.Ack) and (ack.seq, ack.status) == (7, "ok")
    with pytest.raises(AttributeError):
        ack.sequence  # a misspelt field fails where it is read  # noqa: B018
    with pytest.raises(AttributeError):
        ack.seq = 8  # frozen: a receiver cannot rewrite what it was sent
    with pytest.raises(TypeError):
        ack["seq"]  # no string keys  # noqa: B018
    # The schema the codec checks is the classes' fields, in their order.
    for kind, cls in wire.MESSAGES.items():
        declared = [f.name for f in dataclasses.fields(cls) if f.name != "policy_version"]
        assert list(wire.SCHEMA[kind]) == declared, kind


def _raw(msg):
    return wire.seal(msgpack.packb(msg, use_bin_type=True))


@pytest.mark.parametrize("frame,reason", [
    (wire.seal(b"\xc1garbage"), "not_msgpack"),
    (b"", "bad_magic"),
    (b"\xc1garbage and more", "bad_magic"),
    (_raw([1, 2]), "not_a_map"),
    (_raw({"kind": "nope", "schema": wire.SCHEMA_VERSION, "policy_version": 0}), "unknown_kind"),
    (_raw({"kind": "ack", "schema": 99, "policy_version": 0, "seq": 1, "status": "ok", "reason": ""}), "schema_version"),
    (_raw({"kind": "ack", "schema": wire.SCHEMA_VERSION, "policy_version": -1, "seq": 1, "status": "ok", "reason": ""}), "bad_version"),
    (_raw({"kind": "ack", "schema": wire.SCHEMA_VERSION, "policy_version": 0, "status": "ok", "reason": ""}), "missing_field"),
    (_raw({"kind": "ack", "schema": wire.SCHEMA_VERSION, "policy_version": 0, "seq": "1", "status": "ok", "reason": ""}), "bad_type"),
    (_raw({"kind": "ack", "schema": wire.SCHEMA_VERSION, "policy_version": 0, "seq": 1, "status": "maybe", "reason": ""}), "bad_value"),
])
def test_malformed_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(wire.MessageError) as e:
        wire.decode(frame)
    assert e.value.reason == reason


def _mutated(mutate):
    g = _group()
    mutate(g)
    return wire.encode("trajectories", 1, sender="g", incarnation="a", seq=1, groups=[g])


@pytest.mark.parametrize("mutate,reason", [
    (lambda g: setattr(g.completions[0], "logprobs", g.completions[0].logprobs[:-1]), "inconsistent"),
    (lambda g: g.completions[0].logprobs.__setitem__(0, 0.5), "bad_logprob"),
    (lambda g: g.completions[0].logprobs.__setitem__(0, np.nan), "bad_logprob"),
    (lambda g: setattr(g.completions[0], "reward", math.inf), "bad_reward"),
    (lambda g: setattr(g, "completions", []), "inconsistent"),
    (lambda g: setattr(g, "policy_version", -3), "bad_version"),
])
def test_semantically_wrong_trajectories_are_rejected(mutate, reason):
    with pytest.raises(wire.MessageError) as e:
        wire.decode(_mutated(mutate))
    assert e.value.reason == reason


def _with_columns(change):
    groups = [_group(), _group(version=4)]
    msg = {"kind": "trajectories", "schema": wire.SCHEMA_VERSION, "policy_version": 1,
           "sender": "g", "incarnation": "a", "seq": 1, "groups": wire.group_columns(groups)}
    change(msg["groups"])
    return wire.seal(msgpack.packb(msg, default=wire._default, use_bin_type=True))


@pytest.mark.parametrize("change,reason", [
    (lambda c: c.__setitem__("tokens", np.zeros((2, 4), np.int32)), "bad_array"),
    (lambda c: c.__setitem__("logprobs", c["logprobs"].astype(np.int32)), "bad_array"),
    (lambda c: c.pop("reward"), "missing_field"),
    (lambda c: c.__setitem__("group_size", np.array([2, 1], np.int32)), "inconsistent"),
    (lambda c: c.__setitem__("prompt_len", np.array([3, 4], np.int32)), "inconsistent"),
    (lambda c: c.__setitem__("length", np.array([4, 4, 4, 5], np.int32)), "inconsistent"),
    (lambda c: c.__setitem__("length", np.array([8, 0, 4, 4], np.int32)), None),  # adds up
    (lambda c: c.__setitem__("length", np.array([-4, 12, 4, 4], np.int32)), "inconsistent"),
    (lambda c: c.__setitem__("created_at", np.zeros(3)), "inconsistent"),
    (lambda c: c.__setitem__("generator", ["gen0", 7]), "bad_type"),
    (lambda c: c.__setitem__("finish_reason", ["stop"] * 3), "inconsistent"),
    (lambda c: c.__setitem__("tokens", c["tokens"] - 10), "bad_token"),
    (lambda c: c.__setitem__("groups", None), None),  # unknown column: ignored
])
def test_columns_that_do_not_fit_together_are_rejected(change, reason):
    frame = _with_columns(change)
    if reason is None:
        assert len(wire.decode(frame).groups) == 2
        return
    with pytest.raises(wire.MessageError) as e:
        wire.decode(frame)
    assert e.value.reason == reason


def test_token_ids_outside_vocab_are_rejected_when_vocab_is_known():
    frame = wire.encode("trajectories", 1, sender="g", incarnation="a", seq=1, groups=[_group(T=4)])
    wire.decode(frame, vocab_size=100)
    with pytest.raises(wire.MessageError) as e:
        wire.decode(frame, vocab_size=4)
    assert e.value.reason == "bad_token"


def test_truncated_array_payload_is_rejected():
    frame = bytearray(wire.encode("trajectories", 1, sender="g", incarnation="a", seq=1, groups=[_group(T=50)]))
    for cut in (len(frame) // 2, len(frame) - 7):
        with pytest.raises(wire.MessageError):
            wire.decode(bytes(frame[:cut]))


def test_unexpected_kind_is_refused():
    with pytest.raises(wire.MessageError) as e:
        wire.decode(wire.encode("error", 0, reason="x"), expect=("ack",))
    assert e.value.reason == "unexpected_kind"


def test_corrupted_frames_are_caught_by_the_checksum():
    rng = np.random.default_rng(0)
    good = wire.encode("trajectories", 1, sender="g", incarnation="a", seq=1, groups=[_group()])
    reasons = set()
    for _ in range(2000):
        b = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            i = rng.integers(len(b))
            b[i] = (b[i] + rng.integers(1, 256)) % 256  # always a real change
        try:
            wire.decode(bytes(b), vocab_size=300)
            raise AssertionError("a corrupted frame decoded")
        except wire.MessageError as e:
            reasons.add(e.reason)
    assert reasons <= {"bad_checksum", "bad_magic"}


def test_mutated_payloads_with_a_valid_checksum_never_crash_the_decoder():
    rng = np.random.default_rng(1)
    payload = wire.encode("trajectories", 1, sender="g", incarnation="a", seq=1,
                          groups=[_group()])[8:]
    for _ in range(2000):
        b = bytearray(payload)
        for _ in range(rng.integers(1, 6)):
            b[rng.integers(len(b))] = rng.integers(256)
        try:
            wire.decode(wire.seal(bytes(b)), vocab_size=300)
        except wire.MessageError:
            pass


def test_every_token_carries_the_version_that_sampled_it():
    comps = [wire.Completion(np.array([5, 6, 7], np.int32), np.array([-1, -1, -1], np.float32),
                             1.0, "stop", np.array([3, 3, 4])),
             wire.Completion(np.array([8], np.int32), np.array([-1], np.float32), 0.0, "stop")]
    g = wire.TrajectoryGroup(1, np.array([1], np.int32), 3, comps, "gen0", 0.0)
    frame = wire.encode("trajectories", 4, sender="gen0", incarnation="a", seq=1, groups=[g])
    out = wire.decode(frame).groups[0]
    assert out.completions[0].versions.tolist() == [3, 3, 4]
    assert out.completions[1].versions.tolist() == [3]  # None: the group's version
    g.policy_version = 4  # claims to be newer than its oldest token
    bad = wire.encode("trajectories", 4, sender="gen0", incarnation="a", seq=1, groups=[g])
    with pytest.raises(wire.MessageError) as e:
        wire.decode(bad)
    assert e.value.reason == "bad_version"


def _with_parts(parts_per_completion):
    g = _group(n=len(parts_per_completion))
    for c, p in zip(g.completions, parts_per_completion):
        c.reward_parts = p
    return g


def test_reward_parts_travel_with_each_completion():
    g = _with_parts([{"correctness": 1.0, "xmlcount": 0.25}, {"correctness": 0.0, "xmlcount": 0.5}])
    out = wire.decode(wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1,
                                  groups=[g, _with_parts([{"correctness": 1.0, "xmlcount": 0.0}])]))
    assert [c.reward_parts for gr in out.groups for c in gr.completions] == [
        {"correctness": 1.0, "xmlcount": 0.25}, {"correctness": 0.0, "xmlcount": 0.5},
        {"correctness": 1.0, "xmlcount": 0.0}]
    plain = wire.decode(wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1,
                                    groups=[_group()]))
    assert all(c.reward_parts is None for c in plain.groups[0].completions)


def test_completions_with_other_reward_parts_are_not_encoded_together():
    g = _with_parts([{"correctness": 1.0}, {"xmlcount": 0.5}])
    with pytest.raises(ValueError, match="same reward parts"):
        wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1, groups=[g])


@pytest.mark.parametrize("change,reason", [
    (lambda c: c.update(reward_parts=c["reward_parts"][:-1]), "inconsistent"),
    (lambda c: c.update(reward_parts=np.array([1.0, math.nan, 0.0, 1.0])), "bad_reward"),
    (lambda c: c.update(reward_part_names=["a", "a"]), "bad_value"),
    (lambda c: c.update(reward_part_names=[f"p{i}" for i in range(33)],
                        reward_parts=np.zeros(66)), "bad_value"),
    (lambda c: c.update(reward_part_names=["x" * 200, "y"]), "bad_value"),
    (lambda c: c.update(sources=np.full(len(c["sources"]), 2, np.uint8)), "bad_value"),
    (lambda c: c.update(sources=c["sources"][:-1]), "inconsistent"),
    (lambda c: c.update(sources=c["sources"].astype(np.float32)), "bad_array"),
])
def test_bad_reward_parts_are_refused_naming_why(change, reason):
    g = _with_parts([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}])
    frame = wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1, groups=[g])
    from asyncrl.wire import codec

    msg = msgpack.unpackb(frame[8:], raw=False, ext_hook=codec._unpack_array)
    change(msg["groups"])
    packed = msgpack.packb(msg, default=codec._default, use_bin_type=True)
    with pytest.raises(wire.MessageError) as e:
        wire.decode(wire.seal(packed))
    assert e.value.reason == reason


def _with_samples(of: list[int | None]) -> wire.TrajectoryGroup:
    g = _group(n=len(of))
    for c, k in zip(g.completions, of):
        c.sample_of = k
    return g


def test_separate_samples_travel_after_their_groups_own_completions():
    out = wire.decode(wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1,
                                  groups=[_with_samples([None, None, 1, 0]), _group()]))
    assert [c.sample_of for c in out.groups[0].completions] == [None, None, 1, 0]
    assert len(out.groups[0].episodes) == 2 and len(out.groups[1].episodes) == 2
    assert all(c.sample_of is None for c in out.groups[1].completions)


@pytest.mark.parametrize("of", [
    [None, 2, None],  # a sample before the group's own completions end
    [None, None, 2],  # naming an episode the group does not have
    [0, 0],  # samples of nothing
])
def test_bad_separate_samples_are_refused(of):
    frame = wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1,
                        groups=[_with_samples(of)])
    with pytest.raises(wire.MessageError) as e:
        wire.decode(frame)
    assert e.value.reason == "bad_value" and "sample_of" in str(e.value)


def test_a_sample_of_below_minus_one_is_refused():
    from asyncrl.wire import codec

    frame = wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1,
                        groups=[_group()])
    msg = msgpack.unpackb(frame[8:], raw=False, ext_hook=codec._unpack_array)
    msg["groups"]["sample_of"] = np.array([-1, -5], np.int32)
    with pytest.raises(wire.MessageError) as e:
        wire.decode(wire.seal(msgpack.packb(msg, default=codec._default, use_bin_type=True)))
    assert e.value.reason == "bad_value"

"""The rollout with a fake engine: continuous batching, groups handed back as soon as they
finish, per-token versions, the three in-flight update modes, and a unit kind whose finished
sequence leads to another request (the seam of multi-turn episodes)."""

import random

import pytest

from asyncrl.generator.engine import Delta
from asyncrl.generator.stream import Rollout, SampleGroup, Sequence, Unit


class FakeEngine:
    """Each request emits one token per step (token = step count); finishes after its own
    fixed length, or at max_tokens. Logprob of every token: -0.1 * (weights version + 1)."""

    def __init__(self, lengths):
        self.lengths = lengths  # request number -> completion length
        self.requests = {}  # id -> [prompt, max_tokens, emitted, target]
        self.weights = 0
        self.added = []
        self.aborted = []
        self.n = 0

    def add(self, rid, prompt, temperature, max_tokens, seed=None):
        target = self.lengths[self.n % len(self.lengths)]
        self.n += 1
        self.requests[rid] = [list(prompt), max_tokens, 0, target]
        self.added.append((rid, list(prompt), max_tokens))

    def step(self):
        out = []
        for rid, r in list(self.requests.items()):
            prompt, max_tokens, emitted, target = r
            r[2] += 1
            finished = r[2] >= min(max_tokens, target)
            out.append(Delta(rid, [len(prompt) + emitted], [-0.1 * (self.weights + 1)],
                             finished, ("length" if r[2] >= max_tokens else "stop")
                             if finished else ""))
            if finished:
                del self.requests[rid]
        return out

    def abort(self, ids):
        self.aborted += ids
        for rid in ids:
            self.requests.pop(rid, None)


class _Streamer(Rollout):
    """The rollout with SampleGroups of one size, stepped and taken in one call."""

    def __init__(self, engine, mode, max_inflight, group_size, max_tokens):
        t = iter(range(10**6))
        super().__init__(engine, max_inflight, mode, clock=lambda: float(next(t)))
        self.group_size, self.max_tokens = group_size, max_tokens

    def start(self, key, prompt, version):
        return super().start(SampleGroup(key, prompt, version, self.group_size, 1.0,
                                         self.max_tokens, self.clock()))

    def room(self):
        return super().room(self.group_size)

    def step(self, version):
        super().step(version)
        return self.take_finished()

    def before_update(self, version):
        super().before_update(version)
        return self.take_finished()

    @property
    def groups(self):
        return self.units


def _streamer(engine, mode="keep", max_inflight=8, group_size=2, max_tokens=10):
    return _Streamer(engine, mode, max_inflight, group_size, max_tokens)


def test_groups_come_back_as_they_finish_while_others_keep_running():
    eng = FakeEngine([2, 2, 8, 8])  # group A: 2 tokens each, group B: 8 tokens each
    s = _streamer(eng)
    a = s.start("A", [1], version=0)
    s.start("B", [2], version=0)
    done = []
    for _ in range(2):
        done += s.step(version=0)
    assert done == [a] and s.busy  # A is back after 2 steps, B still running
    assert s.room()  # A's two slots are free again: a new prompt can start now
    s.start("C", [3], version=0)
    assert len(s.running) == 4


def test_room_follows_max_inflight():
    s = _streamer(FakeEngine([5]), max_inflight=4, group_size=2)
    s.start("A", [1], 0)
    s.start("B", [1], 0)
    assert not s.room()


def test_keep_mode_tags_tokens_after_an_update_with_the_new_version():
    eng = FakeEngine([6, 6])
    s = _streamer(eng, "keep")
    s.start("A", [1], 0)
    s.step(0)
    s.step(0)
    assert s.before_update(0) == []
    eng.weights = 1
    s.after_update()
    assert eng.aborted == [] and s.updates_in_flight == 1
    done = []
    while not done:
        done = s.step(1)
    seq = done[0].seqs[0]
    assert seq.versions == [0, 0, 1, 1, 1, 1]
    assert seq.logprobs[:2] == [-0.1, -0.1] and seq.logprobs[2:] == [-0.2] * 4
    assert done[0].oldest_version == 0


def test_abort_mode_resubmits_with_the_tokens_so_far_as_prefix():
    eng = FakeEngine([6, 6])
    s = _streamer(eng, "abort", max_tokens=6)
    s.start("A", [7, 7], 0)
    s.step(0)
    s.step(0)
    s.before_update(0)
    assert len(eng.aborted) == 2 and not s.running
    eng.weights = 1
    s.after_update()
    resubmitted = eng.added[-2:]
    for _rid, prompt, max_tokens in resubmitted:
        assert prompt == [7, 7, 2, 3] and max_tokens == 4  # prompt + the 2 tokens sampled
    done = []
    while not done:
        done = s.step(1)
    for seq in done[0].seqs:
        assert seq.versions == [0, 0, 1, 1, 1, 1] and len(seq.tokens) == 6
        assert seq.logprobs[2:] == [-0.2] * 4  # sampled by the new weights


def test_drain_mode_finishes_running_requests_under_the_old_weights():
    eng = FakeEngine([5, 5])
    s = _streamer(eng, "drain")
    s.start("A", [1], 0)
    s.step(0)
    done = s.before_update(0)  # steps the engine until nothing runs, under version 0
    assert len(done) == 1 and not s.running
    assert all(v == 0 for seq in done[0].seqs for v in seq.versions)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="generator.inflight_update"):
        _streamer(FakeEngine([1]), "pause")


def test_many_groups_of_random_lengths_all_come_back_exactly_once():
    rng = random.Random(0)
    eng = FakeEngine([rng.randint(1, 30) for _ in range(200)])
    s = _streamer(eng, "abort", max_inflight=16, group_size=4, max_tokens=30)
    started, back, version = 0, [], 0
    for step in range(2000):
        while s.room() and started < 50:
            s.start(started, [1], version)
            started += 1
        if step % 7 == 3:
            s.before_update(version)
            version += 1
            eng.weights = version
            s.after_update()
        back += s.step(version)
        if started == 50 and not s.busy and not s.groups:
            break
    assert sorted(g.key for g in back) == list(range(50))
    for g in back:
        for seq in g.seqs:
            assert len(seq.tokens) == len(seq.versions) == len(seq.logprobs) <= 30
            assert seq.versions == sorted(seq.versions)


class _TwoTurns(Unit):
    """A unit whose first sequence, once finished, leads to a second request that continues
    from it (prompt, sampled tokens, an injected observation), as an episode's next turn."""

    def __init__(self, prompt):
        super().__init__([Sequence(list(prompt), 3)])

    def sequence_done(self, seq):
        if len(self.seqs) == 1:
            return [Sequence(seq.prompt + seq.tokens + [99], 3)]
        return []


def test_a_finished_sequence_can_lead_to_the_next_request_of_its_unit():
    eng = FakeEngine([3, 3])
    r = Rollout(eng, 8, "keep", clock=lambda: 0.0)
    unit = r.start(_TwoTurns([5]))
    for v in range(3):
        r.step(v)
    assert r.take_finished() == [] and r.busy  # the second turn is running
    for v in range(3, 6):
        r.step(v)
    assert r.take_finished() == [unit] and not r.busy
    first, second = unit.seqs
    assert eng.added[1][1] == [5] + first.tokens + [99]  # exactly the ids so far, no re-encode
    assert first.versions == [0, 1, 2] and second.versions == [3, 4, 5]


class SaltedEngine(FakeEngine):
    def __init__(self, lengths):
        super().__init__(lengths)
        self.salts = {}

    def add(self, rid, prompt, temperature, max_tokens, seed=None, cache_salt=None):
        self.salts[rid] = cache_salt
        super().add(rid, prompt, temperature, max_tokens, seed)


def test_with_prefix_caching_each_request_is_salted_with_the_version_it_starts_under():
    eng = SaltedEngine([6, 6])
    r = Rollout(eng, 8, "abort", clock=lambda: 0.0, salt_versions=True)
    r.start(SampleGroup("A", [1], 3, 2, 1.0, 10, 0.0), 3)
    r.step(3)
    assert sorted(eng.salts.values()) == ["v3", "v3"]
    r.before_update(3)
    r.after_update(4)  # the aborted requests start again under version 4: not v3's KV
    assert sorted(eng.salts.values()) == ["v3", "v3", "v4", "v4"]
    plain = SaltedEngine([6])
    Rollout(plain, 8, "keep", clock=lambda: 0.0).start(SampleGroup("B", [1], 0, 1, 1.0, 4, 0.0))
    assert list(plain.salts.values()) == [None]

"""The reward service's logic and its generator side, over real sockets with a stand-in
scorer (the real engines are tests/e2e/test_reward_service.py's): requests from several
generators are scored in one batch and each answered with its own scores; a full queue answers
busy and the generator sends again; hostile or impersonating frames are refused and counted,
never fatal; a service that dies with requests unanswered loses none (the generator resends
to its successor) and a late second answer is ignored, so each group is scored once."""

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry

from asyncrl import metrics, transport, wire
from asyncrl.config import load_config
from asyncrl.generator.delivery import Scorer
from asyncrl.generator.scoring import RemoteRewards, ScoreNorm
from asyncrl.reward.main import serve
from asyncrl.reward.service import RewardService
from asyncrl.testing import make_groups
from tests.conftest import free_base_port, wait_until
from tests.helpers.fuzz import hostile_frames


class LengthScorer:  # the score is the completion's length: easy to check per text
    truncated = 0

    def __init__(self):
        self.calls = []

    def score(self, prompts, completions):
        self.calls.append(len(completions))
        return [float(len(c)) + 0.5 for c in completions]


def _service(max_batch=256, max_queue=4096, scorer=None):
    m = metrics.RewardMetrics(CollectorRegistry())
    return RewardService(scorer or LengthScorer(), m, max_batch, max_queue), m


def _request(sender="gen0", seq=1, completions=("a", "bb"), prompts=None, **kw):
    return wire.encode("score_request", 3, sender=sender, incarnation="i", seq=seq,
                       prompts=list(prompts or ["p"] * len(completions)),
                       completions=list(completions), **kw)


def test_requests_from_several_generators_are_scored_in_one_batch_each_answered():
    service, m = _service()
    assert service.take(b"a", _request("gen0", 1, ["a", "bb"]), "gen0") is None
    assert service.take(b"b", _request("gen1", 7, ["ccc"]), "gen1") is None
    replies = service.score(service.next_batch())
    assert service.scorer.calls == [3]  # one engine call for both generators
    got = {ident: wire.decode(r) for ident, r in replies}
    assert (got[b"a"].seq, got[b"a"].scores) == (1, [1.5, 2.5])
    assert (got[b"b"].seq, got[b"b"].scores, got[b"b"].status) == (7, [3.5], "ok")
    assert m.scored._value.get() == 3 and service.queued_texts == 0


def test_batches_take_whole_requests_up_to_max_batch_and_a_full_queue_answers_busy():
    service, m = _service(max_batch=3, max_queue=4)
    for seq in (1, 2):
        assert service.take(b"a", _request(seq=seq, completions=["x", "y"]), "gen0") is None
    busy = wire.decode(service.take(b"a", _request(seq=3, completions=["z"]), "gen0"))
    assert (busy.status, busy.seq) == ("busy", 3) and "reward.max_queue" in busy.reason
    assert [j.seq for j in service.next_batch()] == [1]  # 2 + 2 > max_batch: one request
    assert [j.seq for j in service.next_batch()] == [2]
    big = _request(seq=4, completions=["x"] * 9)  # larger than max_batch: still taken alone
    assert service.take(b"a", big, "gen0") is None
    assert [len(j.prompts) for j in service.next_batch()] == [9]


@pytest.mark.parametrize("frame,role,reason", [
    (b"\x00garbage", "gen0", "bad_magic"),
    (_request(sender="gen1"), "gen0", "impersonation"),
    (_request(prompts=["p"], completions=["a", "b"]), "gen0", "bad_value"),
    (wire.encode("heartbeat", 0, sender="gen0", role="generator"), "gen0", "unexpected_kind"),
])
def test_hostile_frames_are_refused_counted_and_answered(frame, role, reason):
    service, m = _service()
    reply = wire.decode(service.take(b"x", frame, role))
    assert reply.status == "rejected" and reply.scores == []
    assert m.rejected.labels(reason)._value.get() == 1, reason
    assert not service.queue  # nothing queued, and the service goes on
    assert service.take(b"y", _request(), "gen0") is None


def test_a_model_that_scores_nan_answers_zero_and_counts_it():
    class NanScorer(LengthScorer):
        def score(self, prompts, completions):
            return [float("nan"), 1.0]

    service, m = _service(scorer=NanScorer())
    service.take(b"a", _request(), "gen0")
    (_, reply), = service.score(service.next_batch())
    assert wire.decode(reply).scores == [0.0, 1.0]
    assert m.rejected.labels("nonfinite_score")._value.get() == 1


def _groups(n=2):
    return make_groups(n, 2, rng=0, rewards=[[1.0, 0.0]] * n)


def _rig(tmp_keys=None, timeout_s=0.5):
    port = free_base_port() + 7
    ctx = transport.context()
    m = metrics.GeneratorMetrics(CollectorRegistry())
    client = transport.Client(ctx, "127.0.0.1", port, "gen0")
    remote = RemoteRewards(client, "gen0", "inc", window=4, timeout_s=timeout_s,
                           ready_timeout_s=30, where=f"127.0.0.1:{port}", m=m)
    return port, ctx, remote, m


def _start(ctx, port, scorer=None, rounds=None):
    service, m = _service(scorer=scorer)

    def bound():  # a socket closed a moment ago may hold the port for a few milliseconds
        try:
            return transport.Server(ctx, "127.0.0.1", port)
        except OSError:
            return None

    server = wait_until(bound, 10, f"port {port} free again")
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            serve(service, server, m, rounds=1)
        server.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return service, stop, t


def test_the_generator_gets_each_requests_scores_once_over_real_sockets():
    port, ctx, remote, m = _rig()
    service, stop, t = _start(ctx, port)
    try:
        remote.submit(_groups(), 5, time.monotonic(), ["p"] * 4, ["a", "bb", "ccc", "dddd"])
        remote.submit(_groups(1), 5, time.monotonic(), ["p"] * 2, ["e", "ff"])
        done = []
        wait_until(lambda: done.extend(remote.pump(0.05)) or len(done) == 2, 30,
                   "both requests answered")
        assert sorted(w.scores for w in done) == [[1.5, 2.5], [1.5, 2.5, 3.5, 4.5]]
        assert len(remote) == 0 and not remote.full()
    finally:
        stop.set()
        t.join(5)


def test_a_service_that_dies_with_requests_waiting_loses_none_of_them():
    port, ctx, remote, m = _rig(timeout_s=0.5)
    dying = transport.Server(ctx, "127.0.0.1", port)  # takes the request, dies unanswered
    remote.submit(_groups(), 5, time.monotonic(), ["p"] * 4, ["a", "bb", "ccc", "dddd"])
    assert remote.pump(0.0) == []
    wait_until(lambda: transport.poll_servers([dying], 0.1), 10, "the first role got it")
    assert wire.decode(dying.recv().payload).seq == 1
    dying.close()
    service, stop, t = _start(ctx, port)  # the restarted role, which never saw the request
    try:
        done = []
        wait_until(lambda: done.extend(remote.pump(0.05)) or done, 30, "the resent request")
        assert len(done) == 1 and done[0].scores == [1.5, 2.5, 3.5, 4.5]
        assert m.score_resends._value.get() >= 1
        # A late answer to the same request (the first send, answered after all) is ignored.
        late = wire.encode("scores", 5, seq=1, status="ok", reason="", scores=[9.0] * 4)
        assert remote._handle(late) is None and len(remote) == 0
    finally:
        stop.set()
        t.join(5)


def test_a_rejected_request_is_a_bug_named_at_the_generator():
    port, ctx, remote, m = _rig()
    remote.submit(_groups(), 5, time.monotonic(), ["p"] * 4, ["a"] * 4)
    bad = wire.encode("scores", 0, seq=1, status="rejected", reason="prompts and completions",
                      scores=[])
    with pytest.raises(RuntimeError, match="rejected score request 1"):
        remote._handle(bad)
    assert remote._handle(b"junk") is None  # an unreadable reply is counted, not fatal
    assert m.messages_rejected.labels("bad_magic")._value.get() == 1


def test_scores_enter_the_reward_normalised_and_weighted_and_the_part_stays_raw():
    cfg = load_config(None, ["reward.normalize=group", "task.reward_model_weight=2.0"])
    scorer = Scorer(cfg, tok=None)
    g = _groups(1)[0]
    scorer.add_model_scores(g, [3.0, 1.0])
    assert [c.reward for c in g.completions] == pytest.approx([1.0 + 2.0, 0.0 - 2.0], abs=1e-5)
    assert [c.reward_parts["reward_model"] for c in g.completions] == [3.0, 1.0]


def test_score_normalisation_modes():
    assert ScoreNorm("none")([3.0, 1.0]) == [3.0, 1.0]
    assert ScoreNorm("group")([3.0, 1.0]) == pytest.approx([1.0, -1.0], abs=1e-5)
    running = ScoreNorm("running")
    running([0.0, 2.0])
    later = running([4.0])  # mean and std over every score seen: 0, 2, 4
    assert later == pytest.approx([(4.0 - 2.0) / np.std([0.0, 2.0, 4.0])], abs=1e-4)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(frame=hostile_frames("score_request"))
def test_hostile_frames_at_the_reward_port_are_refused_by_the_codecs_reason(frame):
    """Structure-aware fuzzing of the reward role's request handling (the codec's fuzz
    strategies): a frame the codec refuses is answered rejected and counted by the codec's
    own reason; a valid one is queued, or refused as impersonation or for unequal lengths."""
    service, m = _service(max_queue=1 << 30)
    try:
        msg, reason = wire.decode(frame, expect=("score_request",)), None
    except wire.MessageError as e:
        msg, reason = None, e.reason
    reply = service.take(b"x", frame, "gen0")
    if reason is not None:
        assert wire.decode(reply).status == "rejected"
        assert m.rejected.labels(reason)._value.get() == 1
        return
    if msg.sender != "gen0":
        want = "impersonation"
    elif len(msg.prompts) != len(msg.completions):
        want = "bad_value"
    else:
        assert reply is None and len(service.queue) == 1
        (_, answer), = service.score(service.next_batch())
        assert wire.decode(answer).scores == [len(c) + 0.5 for c in msg.completions]
        return
    assert wire.decode(reply).status == "rejected" and m.rejected.labels(want)._value.get() == 1


class _AnsweringService:  # a RemoteRewards whose service answers at once: text length + 0.5
    def __init__(self):
        self.pending, self.asked = [], []

    def __len__(self):
        return len(self.pending)

    def full(self):
        return False

    def submit(self, groups, version, first_token, prompts, completions):
        from asyncrl.generator.scoring import Waiting

        self.asked.append((prompts, completions))
        self.pending.append(Waiting(b"", groups, version, first_token,
                                    scores=[len(c) + 0.5 for c in completions]))

    def pump(self, timeout_s=0.0):
        done, self.pending = self.pending, []
        return done


def test_batch_generation_waits_for_the_services_scores_and_adds_them_to_each_completion(
        tmp_path):
    from transformers import AutoTokenizer

    from asyncrl.generator.delivery import Delivery
    from asyncrl.generator.engine import Sample
    from asyncrl.task.tiny_model import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # the model the role would serve
    cfg = load_config(None, ["reward.service=true", f"task.reward_model={tmp_path}",
                             "task.reward_model_weight=2.0"])
    problems = {7: type("P", (), {"id": 7, "prompt": "40+12=", "answer": "52"})()}
    remote = _AnsweringService()
    stats = type("S", (), {"add": lambda self, g: None})()
    d = Delivery(cfg, "gen0", "inc", Scorer(cfg, tok), problems, None,
                 metrics.GeneratorMetrics(CollectorRegistry()), stats, tmp_path / "acks.jsonl",
                 remote)
    samples = [[Sample(tok.encode("52", add_special_tokens=False), [-0.1, -0.1], "stop"),
                Sample(tok.encode("412", add_special_tokens=False), [-0.1] * 3, "stop")]]
    waited = []
    (g,) = d.batch_groups([7], {7: [1, 2, 3]}, samples, 0, waited.append)
    assert remote.asked == [(["40+12="] * 2, ["52", "412"])]
    assert [c.reward_parts["reward_model"] for c in g.completions] == [2.5, 3.5]
    # correctness (weight 1) plus 2 x the raw score (reward.normalize=none)
    assert [c.reward for c in g.completions] == [1.0 + 5.0, 0.0 + 7.0]

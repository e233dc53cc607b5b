"""The OpenAI-compatible endpoint over real HTTP, with the rollout and a fake engine in a loop
thread: the bearer key, OpenAI-style errors for bad requests, chat rendering by the model's
own template, episodes merged into one trajectory with what the agent added injected (and
the sampled stop token kept), grouped by id, abandoned ones dropped, and the driver."""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from hypothesis import strategies as st

from asyncrl.agents import load_agent
from asyncrl.config import RunConfig
from asyncrl.generator.driver import Driver
from asyncrl.generator.endpoint import Endpoint
from asyncrl.generator.engine import Delta
from asyncrl.generator.episode import INJECTED, SAMPLED
from asyncrl.generator.stream import Rollout
from asyncrl.metrics import GeneratorMetrics
from tests.conftest import free_base_port

KEY = "sk-asyncrl-test"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if tools %}[tools:{{ tools|length }}]{% endif %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


class Engine:
    """Samples 'x' then EOS for every request (logprob -0.5 each), one token per step."""

    def __init__(self, tok):
        self.tok, self.requests, self.added = tok, {}, []

    def add(self, rid, prompt, temperature, max_tokens, seed=None, cache_salt=None):
        self.requests[rid] = [0, max_tokens]
        self.added.append(list(prompt))

    def step(self):
        out = []
        for rid, r in list(self.requests.items()):
            tok = self.tok.encode("x", add_special_tokens=False)[0] if r[0] == 0 else \
                self.tok.eos_token_id
            r[0] += 1
            finished = r[0] >= 2 or r[0] >= r[1]
            out.append(Delta(rid, [tok], [-0.5], finished,
                             ("stop" if r[0] >= 2 else "length") if finished else ""))
            if finished:
                del self.requests[rid]
        return out

    def abort(self, ids):
        for rid in ids:
            self.requests.pop(rid, None)


@pytest.fixture()
def served(model_dir):
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TEMPLATE
    cfg = RunConfig()
    cfg.net.base_port, cfg.net.bind_host = free_base_port(100, 101), "127.0.0.1"
    cfg.generator.endpoint, cfg.generator.group_size = True, 2
    cfg.generator.max_tokens, cfg.generator.max_episode_tokens = 6, 40
    cfg.generator.episode_timeout_s = 3.0
    m = GeneratorMetrics(CollectorRegistry())
    ep = Endpoint(cfg, tok, "gen0", 0, 128, KEY, m)
    ep.start()
    engine = Engine(tok)
    rollout = Rollout(engine, 8, "keep", time.monotonic)
    stop, finished = threading.Event(), []

    def loop():
        while not stop.is_set():
            ep.poll(rollout, 3)
            if rollout.busy:
                rollout.step(3)
            for unit in rollout.take_finished():
                ep.finished(unit)
            finished.extend(ep.take_groups())
            time.sleep(0.002)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield SimpleNamespace(ep=ep, tok=tok, engine=engine, groups=finished, m=m,
                          url=f"http://127.0.0.1:{ep.port}")
    stop.set()
    ep.close()


def post(url, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_request_without_the_key_is_refused_and_counted(served):
    for key in (None, "sk-wrong"):
        status, body = post(served.url + "/v1/completions",
                            {"model": "asyncrl", "prompt": "1+2="}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert served.m.endpoint_rejected.labels("invalid_api_key")._value.get() == 2
    assert not served.engine.added  # nothing reached the engine


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "1+2="}, 404, "model_not_found"),
    ("/v1/completions", {"model": "asyncrl", "prompt": "1+2=", "max_tokens": 999}, 400,
     "max_tokens_too_large"),
    ("/v1/completions", {"model": "asyncrl", "prompt": "1+2=", "frobnicate": 1}, 400,
     "unknown_field"),
    ("/v1/completions", {"model": "asyncrl", "prompt": "1+2=", "n": 3}, 400, "invalid_request"),
    ("/v1/completions", {"model": "asyncrl", "prompt": "1+2=", "stream": "yes"}, 400,
     "invalid_request"),
    ("/v1/completions", {"model": "asyncrl", "prompt": "1+2=",
                         "stream_options": {"include_usage": True}}, 400, "invalid_request"),
    ("/v1/chat/completions", {"model": "asyncrl", "messages": [{"role": "user", "content": "hi"}],
                              "stream": True, "stream_options": {"x": 1}}, 400,
     "invalid_request"),
    ("/v1/completions", {"model": "asyncrl", "prompt": "1+2=", "temperature": 0.3}, 400,
     "invalid_request"),
    ("/v1/completions", {"model": "asyncrl", "prompt": [10**9]}, 400, "invalid_request"),
    ("/v1/chat/completions", {"model": "asyncrl", "messages": "hi"}, 400, "invalid_request"),
    ("/v1/chat/completions", {"model": "asyncrl", "messages": [{"role": "robot"}]}, 400,
     "invalid_request"),
    ("/v1/nothing", {"model": "asyncrl"}, 404, "not_found"),
    ("/episodes/a%20b/v1/completions", {"model": "asyncrl", "prompt": "1"}, 400, "bad_episode"),
    ("/episodes/e1/reward", {"reward": "yes"}, 400, "invalid_request"),
    ("/episodes/never/reward", {"reward": 1.0}, 404, "unknown_episode"),
])
def test_bad_requests_get_openai_style_errors(served, path, body, status, code):
    got, reply = post(served.url + path, body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["code"] == code and reply["error"]["message"]


def test_garbage_bodies_never_stop_the_endpoint(served):
    for raw in (b"{", b"\xff\xfe", b"[]", b"null", json.dumps({"a": [1] * 1000}).encode()):
        status, reply = post(served.url + "/v1/completions", None, raw=raw)
        assert 400 <= status < 500 and "error" in reply
    status, reply = post(served.url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    assert status == 200 and reply["choices"][0]["text"] == "x"


def test_a_chat_call_is_rendered_by_the_models_template_and_recorded(served):
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    status, reply = post(served.url + "/v1/chat/completions",
                         {"model": "asyncrl", "messages": messages, "tools": tools,
                          "logprobs": True})
    assert status == 200, reply
    want = served.tok.encode(served.tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    rec = reply["asyncrl"]
    assert rec["prompt_token_ids"] == want == served.engine.added[-1]
    assert rec["token_ids"][-1] == served.tok.eos_token_id and rec["versions"] == [3, 3]
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "x"}
    assert [c["logprob"] for c in reply["choices"][0]["logprobs"]["content"]] == [-0.5, -0.5]
    assert reply["usage"]["completion_tokens"] == 2


def test_streamed_calls_send_a_chunk_per_step_and_the_same_text_and_record(served):
    """stream=true with the real openai client, chat and completions: chunks as the engine
    samples, their text the non-streamed text, the record on the chunk with the finish
    reason, the usage when asked; the call is recorded into its episode as any other."""
    import asyncio

    pytest.importorskip("openai")
    from openai import AsyncOpenAI

    async def calls():
        client = AsyncOpenAI(base_url=served.url + "/episodes/st.0/v1", api_key=KEY,
                             max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(
            model="asyncrl", messages=[{"role": "user", "content": "1+2="}], stream=True,
            logprobs=True, stream_options={"include_usage": True})]
        plain = await client.completions.create(model="asyncrl", prompt="1+2=")
        streamed = [c async for c in await client.completions.create(
            model="asyncrl", prompt="1+2=", stream=True)]
        await client.close()
        return chunks, plain, streamed

    chunks, plain, streamed = asyncio.run(calls())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "x"
    assert sum(len(c.choices[0].logprobs.content) for c in chunks
               if c.choices and c.choices[0].logprobs) == 2  # x and EOS, one step each
    (end,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert end.choices[0].finish_reason == "stop"
    assert end.model_extra["asyncrl"]["versions"] == [3, 3]
    assert chunks[-1].usage.completion_tokens == 2 and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].text for c in streamed)
    assert text == plain.choices[0].text == "x"
    assert streamed[-1].model_extra["asyncrl"]["token_ids"] == (
        plain.model_extra["asyncrl"]["token_ids"])
    assert served.m.endpoint_calls._value.get() == 3


def test_a_refused_streamed_call_gets_a_plain_error(served):
    url = served.url + "/episodes/sr.0/v1/completions"
    post(url, {"model": "asyncrl", "prompt": "1+2="})
    post(served.url + "/episodes/sr.0/reward", {"reward": 1.0})
    # the episode is finished: refused before any chunk, as a JSON error
    status, reply = post(url, {"model": "asyncrl", "prompt": "1+2=", "stream": True})
    assert status == 409 and reply["error"]["code"] == "episode_finished"


def test_an_episode_becomes_one_trajectory_with_the_agents_text_injected(served):
    tok = served.tok
    group = []
    for k in range(2):  # group_size 2: two episodes of group g
        url = served.url + f"/episodes/g.{k}"
        s1, r1 = post(url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
        # the agent continues from the text (the EOS it did not see), adding its own words
        s2, r2 = post(url + "/v1/completions",
                      {"model": "asyncrl", "prompt": "1+2=" + r1["choices"][0]["text"] + " ok"})
        assert s1 == s2 == 200
        assert r2["asyncrl"]["prompt_token_ids"][:len(r1["asyncrl"]["prompt_token_ids"]) + 2] \
            == r1["asyncrl"]["prompt_token_ids"] + r1["asyncrl"]["token_ids"]
        s3, r3 = post(url + "/reward", {"reward": float(k)})
        assert s3 == 200 and r3["trained"] is True
        group.append((r1, r2))
    deadline = time.monotonic() + 5
    while not served.groups and time.monotonic() < deadline:
        time.sleep(0.01)
    (g,) = served.groups
    traj = g.trajectory("gen0")
    first = group[0][0]["asyncrl"]
    assert traj.prompt_tokens.tolist() == first["prompt_token_ids"]
    c = traj.completions[0]
    x, eos = tok.encode("x", add_special_tokens=False)[0], tok.eos_token_id
    added = tok.encode(" ok", add_special_tokens=False)
    assert c.tokens.tolist() == [x, eos, *added, x, eos]
    assert c.sources.tolist() == [SAMPLED, SAMPLED, *[INJECTED] * len(added), SAMPLED, SAMPLED]
    assert c.logprobs.tolist() == [-0.5, -0.5, *[0.0] * len(added), -0.5, -0.5]
    assert [c.reward for c in traj.completions] == [0.0, 1.0]
    # a finished episode takes no more calls
    status, reply = post(served.url + "/episodes/g.0/v1/completions",
                         {"model": "asyncrl", "prompt": "1+2="})
    assert status == 409 and reply["error"]["code"] == "episode_finished"


def test_an_episode_whose_prompt_does_not_extend_it_is_served_but_not_trained(served):
    url = served.url + "/episodes/h.0"
    post(url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    status, reply = post(url + "/v1/completions", {"model": "asyncrl", "prompt": "9+9="})
    assert status == 200 and reply["choices"][0]["text"] == "x"
    status, reply = post(url + "/reward", {"reward": 1.0})
    assert status == 200 and reply["trained"] is False
    post(served.url + "/episodes/h.1/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    post(served.url + "/episodes/h.1/reward", {"reward": 0.0})
    time.sleep(0.2)
    assert not served.groups  # the group lost an episode: dropped, counted
    assert served.m.endpoint_episodes.labels("not_mergeable")._value.get() == 1
    assert served.m.endpoint_groups.labels("dropped")._value.get() == 1


def test_an_episode_that_rewrites_its_history_is_trained_as_separate_samples(served):
    """prime-rl's rule: a call whose prompt starts with the episode's first prompt but does
    not extend its ids starts a separate sample; every sample has the episode's reward, the
    learner gives it the episode's advantage."""
    from asyncrl import wire
    from asyncrl.algo.advantages import grpo_advantages
    from asyncrl.learner.batch import collate

    tok = served.tok
    url = served.url + "/episodes/s.0"
    s1, r1 = post(url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    # the agent rewrote what the model said ("y", not "x"): the ids do not extend
    s2, r2 = post(url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2=y again"})
    s3, r3 = post(url + "/v1/completions",
                  {"model": "asyncrl", "prompt": "1+2=y again" + r2["choices"][0]["text"] + "!"})
    assert s1 == s2 == s3 == 200
    assert r2["asyncrl"]["prompt_token_ids"] == (r1["asyncrl"]["prompt_token_ids"]
                                                 + tok.encode("y again", add_special_tokens=False))
    status, reply = post(url + "/reward", {"reward": 1.0})
    assert status == 200 and reply["trained"] is True
    post(served.url + "/episodes/s.1/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    post(served.url + "/episodes/s.1/reward", {"reward": 0.0})
    assert _until(lambda: served.groups, 5)
    (g,) = served.groups
    traj = wire.decode(wire.encode("trajectories", 3, sender="gen0", incarnation="a", seq=1,
                                   groups=[g.trajectory("gen0")])).groups[0]
    x, eos = tok.encode("x", add_special_tokens=False)[0], tok.eos_token_id
    again, bang = (tok.encode(t, add_special_tokens=False) for t in ("y again", "!"))
    assert [c.sample_of for c in traj.completions] == [None, None, 0]
    own, other, sample = traj.completions
    assert sample.tokens.tolist() == [x, eos] and sample.sources is None  # all sampled
    assert own.tokens.tolist() == [*again, x, eos, *bang, x, eos]
    assert own.sources.tolist() == ([INJECTED] * len(again) + [SAMPLED] * 2
                                    + [INJECTED] * len(bang) + [SAMPLED] * 2)
    assert [c.reward for c in traj.completions] == [1.0, 0.0, 1.0]
    assert served.m.endpoint_episodes.labels("split")._value.get() == 1
    batch = collate([traj], tok.pad_token_id)
    assert batch.rewards.tolist() == [[1.0, 0.0]] and batch.row_episode.tolist() == [0, 1, 0]
    adv = grpo_advantages(batch.rewards).reshape(-1, 1)[batch.row_episode]
    assert adv[2] == adv[0] > 0 > adv[1]


def test_an_episode_longer_than_its_budget_is_refused(served):
    url = served.url + "/episodes/long.0"
    prompt = "1+2="
    for _ in range(30):
        status, reply = post(url + "/v1/completions", {"model": "asyncrl", "prompt": prompt})
        if status != 200:
            break
        prompt += reply["choices"][0]["text"] + "more"
    assert status == 400 and reply["error"]["param"] == "max_tokens"
    assert "max_episode_tokens" in reply["error"]["message"]
    # the refused call left its episode as it was: the agent's text it carried is not in it,
    # so what travels fits the learner's bound (a longer row would cost the learner the batch)
    post(url + "/reward", {"reward": 1.0})
    post(served.url + "/episodes/long.1/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    post(served.url + "/episodes/long.1/reward", {"reward": 0.0})
    assert _until(lambda: served.groups, 5)
    (g,) = served.groups
    long = g.trajectory("gen0").completions[0]
    assert len(long.tokens) <= served.ep.episode_tokens
    assert long.sources[-1] == SAMPLED and long.tokens[-1] == served.tok.eos_token_id


def test_an_abandoned_episode_is_ended_and_its_calls_dropped(served):
    post(served.url + "/episodes/a.0/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    deadline = time.monotonic() + 10
    while (served.m.endpoint_episodes.labels("abandoned")._value.get() < 1
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert served.m.endpoint_episodes.labels("abandoned")._value.get() == 1
    status, reply = post(served.url + "/episodes/a.0/v1/completions",
                         {"model": "asyncrl", "prompt": "1+2="})
    assert status == 409


async def _agent(problem, base_url, api_key):
    """Two calls through the real openai client; the reward is whether the text is x."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key)
    first = await client.completions.create(model="asyncrl", prompt=problem.prompt,
                                            max_tokens=4)
    again = await client.completions.create(model="asyncrl", prompt=problem.prompt
                                            + first.choices[0].text + " again", max_tokens=4)
    return float(again.choices[0].text == "x")


async def _broken(problem, base_url, api_key):
    raise RuntimeError("the agent fell over")


async def _hang(problem, base_url, api_key):
    import asyncio

    await asyncio.sleep(600)
    return 1.0


def _until(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("process", [True, False], ids=["agent-process", "thread"])
def test_the_driver_runs_an_openai_client_agent_per_episode(served, process):
    pytest.importorskip("openai")
    driver = Driver(_agent, served.ep, process=process)
    try:
        driver.launch(SimpleNamespace(prompt="1+2=", answer="3"), 2)
        assert _until(lambda: served.groups, 60)
        (g,) = served.groups
        traj = g.trajectory("gen0")
        assert [c.reward for c in traj.completions] == [1.0, 1.0]
        assert all(INJECTED in c.sources.tolist() for c in traj.completions)
        assert _until(lambda: driver.groups == 0, 5)
        if process:  # the agent ran in a process of its own, not in this interpreter
            assert driver.proc.is_alive() and driver.proc.pid != os.getpid()
    finally:
        driver.close()
    if process:
        assert not driver.proc.is_alive()


def test_an_agent_that_raises_ends_its_episode_and_drops_the_group(served):
    async def broken(problem, base_url, api_key):  # a closure: the thread driver runs it
        raise RuntimeError("the agent fell over")

    dropped = served.m.endpoint_groups.labels("dropped")
    for fn, process in ((broken, False), (_broken, True)):
        driver = Driver(fn, served.ep, process=process)
        before = dropped._value.get()
        driver.launch(SimpleNamespace(prompt="1+2=", answer="3"), 2)
        assert _until(lambda b=before: dropped._value.get() > b, 60)
        driver.close()
    assert served.m.endpoint_episodes.labels("agent_error")._value.get() == 4
    assert not served.groups


async def _garbage(problem, base_url, api_key):
    return "twelve"


def test_an_agent_that_hangs_or_answers_garbage_ends_its_episodes_as_errors(served):
    """A hung agent ends after generator.episode_timeout_s (3 s here), so its group frees its
    place in the driver; a reward that is not a number ends the episode too."""
    for fn in (_hang, _garbage):
        driver = Driver(fn, served.ep, process=True)
        try:
            driver.launch(SimpleNamespace(prompt="1+2=", answer="3"), 2)
            assert _until(lambda d=driver: d.groups == 0, 60)
        finally:
            driver.close()
    assert served.m.endpoint_episodes.labels("agent_error")._value.get() == 4
    assert served.m.endpoint_groups.labels("dropped")._value.get() == 2 and not served.groups


def test_a_killed_agent_process_ends_its_episodes_and_is_started_again(served):
    driver = Driver(_hang, served.ep, process=True)
    try:
        driver.launch(SimpleNamespace(prompt="1+2=", answer="3"), 2)
        first = driver.proc
        assert _until(lambda: first.is_alive(), 30)
        time.sleep(1.0)  # the episodes are in the process
        os.kill(first.pid, signal.SIGKILL)
        assert _until(lambda: driver.groups == 0, 30)
        assert _until(lambda: served.m.endpoint_groups.labels("dropped")._value.get() == 1, 10)
        assert served.m.endpoint_episodes.labels("agent_error")._value.get() == 2
        assert _until(lambda: driver.proc is not first and driver.proc.is_alive(), 30)
    finally:
        driver.close()


def test_the_agent_process_exits_once_its_parent_is_gone():
    """The watchdog: a worker whose parent pid is not its parent's exits by itself (as it
    does when the generator is SIGKILLed and it is re-parented)."""
    import multiprocessing as mp

    from asyncrl.agents import worker

    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=worker.serve, args=(_hang, "http://127.0.0.1:9", KEY, commands,
                                                   results, -1))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0


def test_task_agent_names_an_async_function():
    assert load_agent("tests.unit.test_endpoint:_agent").__name__ == "_agent"
    for bad, why in [("nomodule", "package.module:function"),
                     ("tests.unit.test_endpoint:nothing", "has no attribute"),
                     ("tests.unit.test_endpoint:post", "not an async function")]:
        with pytest.raises(ValueError, match=why):
            load_agent(bad)


def test_asyncrl_keys_makes_and_prints_the_endpoint_key(tmp_path):
    import os

    from asyncrl.transport import endpoint_key, load_keys
    from tests.conftest import asyncrl

    r = asyncrl("keys", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    key = endpoint_key(tmp_path / "k")
    assert key.startswith("sk-asyncrl-") and len(key) > 40 and f"Bearer {key}" in r.stdout
    assert os.stat(tmp_path / "k" / "endpoint.token").st_mode & 0o777 == 0o600
    load_keys(tmp_path / "k", "gen0")  # the CURVE keys still load beside it
    again = asyncrl("keys", str(tmp_path / "k"))
    assert endpoint_key(tmp_path / "k") == key and again.returncode == 0  # kept, not remade


def test_a_client_that_sends_less_than_it_announced_is_cut_off(served):
    import socket

    with socket.create_connection(("127.0.0.1", served.ep.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{KEY}\r\nContent-Length: 500\r\n\r\n{{".encode())
        t0 = time.monotonic()
        got = sock.recv(4096)  # the server closes once generator.episode_timeout_s passes
        assert time.monotonic() - t0 < 8
    assert b"200" not in got.split(b"\r\n")[0]
    status, reply = post(served.url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    assert status == 200  # and it still serves everyone else



# ---------------------------------------------------------------- the port, fuzzed

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)
_FIELDS = sorted({"model", "messages", "prompt", "max_tokens", "max_completion_tokens",
                  "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "seed",
                  "user", "tools", "tool_choice", "reward", "role", "content"})


@st.composite
def _hostile_call(draw):
    """A request as an attacker or a broken agent would send it: known fields with any
    values (often the right model and a plausible prompt, so the deeper checks are reached),
    unknown fields, any episode path."""
    body = {k: draw(_VALUES) for k in draw(st.lists(st.sampled_from(_FIELDS), max_size=6))}
    if draw(st.booleans()):
        body["model"] = "asyncrl"
    if draw(st.booleans()):
        body["prompt"] = draw(st.sampled_from(["1+2=", [1, 2, 3], "", [10**12], [-1]]))
    if draw(st.booleans()):
        body["messages"] = draw(st.sampled_from([
            [{"role": "user", "content": "1+2="}], [{"role": "user", "content": [
                {"type": "text", "text": "hi"}]}], [{"role": "tool"}], [{}], []]))
    episode = draw(st.sampled_from(["", "/episodes/f.0", "/episodes/f.1", "/episodes/..",
                                    "/episodes/" + "e" * 200, "/episodes/%00"]))
    route = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/reward",
                                  "/v1/models", "/v2/x"]))
    return episode + route, body


def _send_raw(url: str, raw: bytes) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=raw, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def test_hostile_calls_get_an_answer_and_never_a_server_error(served):
    """Structure-aware fuzzing of the endpoint's port: every request is answered with 200 or
    an OpenAI-style 4xx error (never a 5xx, a dropped connection or a hang), and the endpoint
    serves a valid call afterwards."""
    from hypothesis import HealthCheck, given, settings

    seen = set()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_hostile_call())
    def one(call):
        path, body = call
        try:
            raw = json.dumps(body).encode()
        except ValueError:  # NaN and friends: sent as Python writes them
            raw = repr(body).encode()
        status, data, kind = _send_raw(served.url + path, raw)
        seen.add(status)
        if status == 200:  # a whole answer, or a stream that ends as streams do
            assert (json.loads(data) if "json" in kind else data.endswith(b"data: [DONE]\n\n"))
        else:
            assert 400 <= status < 500 and "error" in json.loads(data), (status, data)

    one()
    assert seen - {200} and 200 in seen, seen  # refusals, and calls that got through
    status, reply = post(served.url + "/v1/completions", {"model": "asyncrl", "prompt": "1+2="})
    assert status == 200 and reply["choices"][0]["text"] == "x"

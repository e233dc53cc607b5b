"""Any agent as a rollout: an OpenAI-compatible endpoint on a generator (generator.endpoint).

Each generator serves `POST /v1/chat/completions` and `POST /v1/completions` on
net.endpoint_port(i), backed by the same engine and continuous batching as its own rollouts:
a call is one engine request (`ApiCall`, a unit of asyncrl/generator/stream.py), so in-flight
updates, staleness and per-token versions apply to it as to any other. The prompt is the
model's own rendering (`apply_chat_template`, tools included; a completion prompt is encoded
as the task's prompts are), and each call's prompt ids, sampled ids, behaviour logprobs and
policy versions are recorded (and returned to the caller under `asyncrl` in the response).
With `stream: true` the answer is server-sent events, a chunk per engine step with what it
sampled (asyncrl/generator/openai_api.py: the request checks and the answers' bodies).

Episodes. Calls under `/episodes/<id>/v1/...` belong to episode `<id>`; the episode ends with
`POST /episodes/<id>/reward {"reward": r}` (or, with task.agent, the agent function's return
value). Its calls become one trajectory when each call's prompt extends everything before it
(the first prompt, the sampled tokens, what the agent added): the tokens the agent added
between two calls are injected (masked: no loss, as an environment's observation), and the
next call continues from the ids the engine sampled, never from a re-rendering of their text.
A model's turn that ended with its stop token may come back without it (the agent kept the
text, not the ids): the sampled stop token stays, and what follows is injected. A call whose
prompt does not extend the episode but starts with its first prompt (the agent rewrote or
re-tokenized its history) starts a separate sample of the episode (prime-rl's rule):
everything after the first prompt injected, the sample's calls merged as before; every sample
carries the episode's reward and takes its advantage (wire.Completion.sample_of; counted:
`endpoint_episodes{outcome="split"}`). A call whose prompt does not even start with the first
prompt is served, and the episode is not trained on (`outcome="not_mergeable"`). Episodes are
grouped by the id before their last `.` (`<group>.<k>`): `generator.group_size` ended episodes
of a group are one training group (GRPO's), sent to the buffer like any other; a group whose
episodes started from different prompts, or with an episode dropped, is dropped and counted.

The driver (task.agent=`package.module:function`): an async function (problem, base_url,
api_key) -> reward, run `group_size` times per training problem in an agent process of its
own (asyncrl/generator/driver.py), each run one episode against this generator's endpoint
(base_url `http://<host>:<port>/episodes/<group>.<k>/v1`, so an unmodified OpenAI client
works).

Access and bad input: every request needs `Authorization: Bearer <key>` (RUN_DIR/keys/
endpoint.token; `asyncrl keys` prints it); the server binds net.bind_host. Refused requests get
OpenAI-style error bodies (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status
and are counted by reason; nothing a client sends stops the generator. An episode with no call
and no reward for generator.episode_timeout_s is abandoned: ended, counted, its calls dropped.

Threads: HTTP handler threads parse, check and render, then hand the call to the generator's
loop (a queue) and wait; everything that touches the engine, the episodes and the groups runs
in the loop (`Endpoint.poll`, `Endpoint.finished`), between two engine steps.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from asyncrl import wire
from asyncrl.generator.episode import (
    SAMPLED,
    EpisodeGroup,
    completion_of,
    inject,
)
from asyncrl.generator.openai_api import (
    MAX_BODY_BYTES,
    MODEL_NAME,
    ApiError,
    Renderer,
    Request,
    Stream,
    response,
)
from asyncrl.generator.stream import Sequence, Unit

log = logging.getLogger(__name__)

# How an episode ended (endpoint_episodes{outcome}): "ok" (one sample), "split" (trained as
# separate samples: a call rewrote its history), "not_mergeable" (a call's prompt did not
# start with the episode's first prompt: not trained), "abandoned", "agent_error", "no_call".
TRAINED = ("ok", "split")


# ------------------------------------------------------------------ episodes


class AgentEpisode:
    """One episode of an agent's calls, as asyncrl/generator/episode.py's Episode keeps one:
    the first prompt, then every token after it with its logprob, version and source."""

    def __init__(self, eid: str, started: float):
        self.id, self.started, self.last_active = eid, started, started
        self.prompt: list[int] = []
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.sources: list[int] = []
        self.turns = 0
        self.reward = 0.0
        self.finish_reason = ""
        self.outcome = ""  # "" while open; one of OUTCOMES
        self.running = False  # a call of it is in the engine
        self.env_seconds: list[float] = []  # the agent's time between calls
        self.truncated_observations = 0
        self.env = None
        self.merges = True
        self.final: Reward | None = None  # a reward that came while a call ran
        # Earlier samples of this episode (prime-rl's rule): (ids, logprobs, versions,
        # sources, finish_reason) after the first prompt, one per run of calls that extend
        # one another; the run going on is in ids .. sources.
        self.samples: list[tuple] = []

    def request(self, ids: list[int], stop_ids: set[int]) -> list[int]:
        """The engine request for a call whose rendered prompt is `ids`: the episode's
        transcript (the ids it sampled) plus what the agent added, injected. A prompt that does
        not extend the transcript but starts with the episode's first prompt (a rewritten
        history) starts a separate sample of the episode, everything after the first prompt
        injected; one that does not even start with it is served, and the episode is not
        trained."""
        if not self.prompt and not self.ids:
            self.prompt = list(ids)
            return list(ids)
        at = _extends(ids, self.prompt, self.ids, self.sources, stop_ids)
        if at is None:
            if ids[:len(self.prompt)] != self.prompt:
                self.merges = False
                return list(ids)
            version = self.versions[-1] if self.versions else 0
            if SAMPLED in self.sources:
                self.samples.append((self.ids, self.logprobs, self.versions, self.sources,
                                     self.finish_reason))
            self.ids, self.logprobs, self.versions, self.sources = [], [], [], []
            inject(self, ids[len(self.prompt):], version)
            return self.prompt + self.ids
        self._inject(ids[at:])
        return self.prompt + self.ids

    def _inject(self, extra: list[int]) -> None:
        inject(self, extra, 0)

    def snapshot(self) -> tuple:
        """What `request` may change, to restore when the call is refused after it."""
        return (list(self.prompt), list(self.ids), list(self.logprobs), list(self.versions),
                list(self.sources), list(self.samples), self.merges)

    def restore(self, state: tuple) -> None:
        (self.prompt, self.ids, self.logprobs, self.versions, self.sources, self.samples,
         self.merges) = state

    def separate_samples(self, of: int) -> list[wire.Completion]:
        """The earlier samples of a split episode, as separate samples of its group's
        episode `of`, each with the episode's reward."""
        return [wire.Completion(np.asarray(ids, np.int32), np.asarray(lps, np.float32),
                                self.reward, reason, np.asarray(vs, np.int64),
                                reward_parts=self.parts(), sources=np.asarray(srcs, np.uint8),
                                sample_of=of)
                for ids, lps, vs, srcs, reason in self.samples]

    def turn_done(self, seq: Sequence, merged: bool) -> None:
        self.turns += 1
        if merged and self.merges:
            self.ids += seq.tokens
            self.logprobs += seq.logprobs
            self.versions += seq.versions
            self.sources += [SAMPLED] * len(seq.tokens)
        self.finish_reason = seq.finish_reason or "stop"

    @property
    def finished(self) -> bool:
        return bool(self.outcome)

    @property
    def done(self) -> bool:
        return bool(self.outcome)

    @property
    def waiting(self) -> bool:
        return False

    def parts(self) -> dict[str, float]:
        return {"agent": self.reward, "episode_turns": float(self.turns)}

    def completion(self) -> wire.Completion:
        return completion_of(self)  # trained only when ok: it has a turn, a finish reason


def _extends(ids: list[int], prompt: list[int], after: list[int], sources: list[int],
             stop_ids: set[int]) -> int | None:
    """Where `ids` (a call's rendered prompt) goes past the episode so far (`prompt`, then
    `after` with its `sources`), or None when it does not extend it. A stop token the model
    sampled may be missing from `ids` (the agent sent back the text, which drops it): it is
    skipped, and stays in the episode as sampled."""
    if ids[:len(prompt)] != prompt:
        return None
    j = len(prompt)
    for t, src in zip(after, sources):
        if j < len(ids) and ids[j] == t:
            j += 1
        elif not (src == SAMPLED and t in stop_ids):
            return None
    return j


class AgentGroup(EpisodeGroup):
    """group_size ended episodes of one group, as one training group (Delivery sends it as
    it sends an environment's EpisodeGroup), with the separate samples of split episodes after
    the group's own completions."""

    def __init__(self, key: int, episodes: list[AgentEpisode], version: int):
        Unit.__init__(self, [])
        self.key, self.version = key, version
        self.started_at = min(e.started for e in episodes)
        self.first_token_at = self.started_at
        self.episodes = episodes
        self._of = {}

    @property
    def oldest_version(self) -> int:
        earlier = (v for e in self.episodes for _, _, vs, srcs, _ in e.samples
                   for v, src in zip(vs, srcs) if src == SAMPLED)
        return min([EpisodeGroup.oldest_version.fget(self), *earlier])

    def trajectory(self, name: str) -> wire.TrajectoryGroup:
        group = super().trajectory(name)
        for k, e in enumerate(self.episodes):
            group.completions += e.separate_samples(k)
        return group


class ApiCall(Unit):
    """One call of the endpoint: one engine request (with its stream's state when the call
    asked for one)."""

    def __init__(self, call: Call, ids: list[int], temperature: float, merged: bool,
                 stream: Stream | None = None):
        super().__init__([Sequence(list(ids), call.request.max_tokens, temperature)])
        self.call, self.merged, self.stream = call, merged, stream
        self.started_at = time.monotonic()
        self.first_token_at = None


@dataclass
class Call:
    """A call handed from an HTTP thread to the loop, and its answer."""

    request: Request
    episode: str | None
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 200
    body: dict | None = None
    # stream=true: ("chunk", body) per engine step, then ("done", None); or ("error", status,
    # body) when the call is refused
    events: queue.SimpleQueue | None = None


@dataclass
class Reward:
    episode: str
    reward: float
    error: str = ""  # the agent raised (task.agent)
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 200
    body: dict | None = None


def group_of(eid: str) -> str:
    return eid.rsplit(".", 1)[0] if "." in eid else eid


def group_key(group: str) -> int:
    """A training group's prompt id for an agent group (the buffer's identity of it)."""
    return zlib.crc32(group.encode()) | (1 << 40)


class Endpoint:
    """The loop's side: takes calls and rewards from the HTTP threads and the driver, runs
    calls in the rollout, keeps the episodes, and hands out complete groups."""

    def __init__(self, cfg, tok, name: str, index: int, max_model_len: int, key: str,
                 metrics, clock=time.monotonic):
        from asyncrl.task import encode_prompt

        gc = cfg.generator
        self.name, self.key, self.m, self.clock = name, key, metrics, clock
        self.temperature, self.group_size = gc.temperature, gc.group_size
        self.timeout_s = gc.episode_timeout_s
        self.max_model_len = max_model_len
        self.episode_tokens = cfg.max_completion_tokens  # the learner's bound after a prompt
        self.renderer = Renderer(tok, gc.temperature, gc.max_tokens,
                                 lambda text: encode_prompt(tok, text, False))
        self.tok = tok
        self.stop_ids = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        self.host, self.port = cfg.net.bind_host, cfg.net.endpoint_port(index)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: list[ApiCall] = []
        self.streams: list[ApiCall] = []  # running calls that asked for a stream
        self.episodes: dict[str, AgentEpisode] = {}
        self.ended: dict[str, list[AgentEpisode]] = {}  # group -> its ended episodes
        self.closed: OrderedDict[str, None] = OrderedDict()  # ended episode ids (the newest)
        self.ready: list[AgentGroup] = []
        self.server: ThreadingHTTPServer | None = None

    # -------------------------------------------------------------- HTTP side

    def start(self) -> None:
        handler = _handler(self)
        self.server = _Server((self.host, self.port), handler)
        threading.Thread(target=self.server.serve_forever, name="endpoint",
                         daemon=True).start()
        log.info("%s: OpenAI-compatible endpoint on http://%s:%d/v1 (episodes under "
                 "/episodes/<id>/v1)", self.name, self.host, self.port)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def refused(self, reason: str) -> None:
        self.m.endpoint_rejected.labels(reason).inc()

    # -------------------------------------------------------------- loop side

    def poll(self, rollout, version: int) -> None:
        """Between engine steps: take what the HTTP threads and the driver handed over,
        start the calls there is room for, end abandoned episodes."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Call):
                self._call(item)
            else:
                self._ended(item, version)
        while self.pending and rollout.room(1):
            unit = self.pending.pop(0)
            rollout.start(unit, version)
            if unit.stream is not None:
                self.streams.append(unit)
        for unit in self.streams:  # what the engine sampled since the last poll
            if (chunk := unit.stream.delta(unit.seqs[0])) is not None:
                unit.call.events.put(("chunk", chunk))
        self._expire(version)

    def _answer(self, item, status: int, body: dict) -> None:
        item.status, item.body = status, body
        events = getattr(item, "events", None)
        if events is not None:
            events.put(("error", status, body) if status != 200 else ("done", None))
        item.done.set()

    def _call(self, call: Call) -> None:
        ids, merged, ep = call.request.prompt, True, None
        if call.episode is not None:
            ep = self._episode_of(call)
            if ep is None:
                return None
            before = ep.snapshot()
            ids = ep.request(ids, self.stop_ids)
            merged = ep.merges
            if merged and len(ep.ids) + call.request.max_tokens > self.episode_tokens:
                ep.restore(before)  # the refused call leaves its episode as it was
                self.refused("episode_too_long")
                return self._answer(call, 400, ApiError(
                    400, f"episode {call.episode!r} would exceed {self.episode_tokens} tokens "
                    "after its first prompt (generator.max_episode_tokens)", "max_tokens",
                    "max_tokens_too_large").body())
        if len(ids) + call.request.max_tokens > self.max_model_len:
            if ep is not None:
                ep.restore(before)
            self.refused("too_long")
            return self._answer(call, 400, ApiError(
                400, f"prompt ({len(ids)} tokens) + max_tokens exceeds the model's "
                f"{self.max_model_len} positions", "max_tokens", "context_length_exceeded"
            ).body())
        if ep is not None:
            ep.running = True
        self.m.endpoint_calls.inc()
        stream = Stream(self.tok, call.request) if call.request.stream else None
        self.pending.append(ApiCall(call, ids, self.temperature, merged, stream))

    def _episode_of(self, call: Call) -> AgentEpisode | None:
        """The open episode a call belongs to (made on its first call), or None when the call
        was refused (the episode is finished, or has a call running)."""
        ep = self.episodes.get(call.episode)
        if ep is None:
            if call.episode in self.closed:
                self.refused("episode_finished")
                return self._answer(call, 409, ApiError(
                    409, f"episode {call.episode!r} is finished", None,
                    "episode_finished").body())
            ep = self.episodes[call.episode] = AgentEpisode(call.episode, self.clock())
        if ep.running or ep.final is not None:
            self.refused("episode_busy")
            return self._answer(call, 409, ApiError(
                409, f"episode {call.episode!r} has a call running: an episode's calls "
                "are sequential", None, "episode_busy").body())
        now = self.clock()
        if ep.turns:
            ep.env_seconds.append(now - ep.last_active)
        ep.last_active = now
        return ep

    def finished(self, unit: ApiCall) -> None:
        """A call's request is done: answer it, and add its tokens to its episode."""
        seq = unit.seqs[0]
        call = unit.call
        if call.episode is not None:
            ep = self.episodes.get(call.episode)
            if ep is not None:
                ep.running = False
                ep.last_active = self.clock()
                ep.turn_done(seq, unit.merged)
        if unit.stream is not None:
            self.streams.remove(unit)
            for chunk in unit.stream.last(seq):
                call.events.put(("chunk", chunk))
        self._answer(call, 200, response(self.tok, call.request, seq))
        if call.episode is not None and ep is not None and ep.final is not None:
            self._ended(ep.final, unit.seqs[0].versions[-1] if seq.versions else 0)

    def _ended(self, r: Reward, version: int) -> None:
        ep = self.episodes.get(r.episode)
        if ep is None and not r.error:
            self.refused("unknown_episode")
            return self._answer(r, 404, ApiError(404, f"no episode {r.episode!r} (no call was "
                                                 "made under it)", None,
                                                 "unknown_episode").body())
        if ep is None:  # the agent raised before its first call
            ep = AgentEpisode(r.episode, self.clock())
        elif ep.running:  # ended once its call is done (the agent gave up waiting on it)
            ep.final = r
            return None
        self.episodes.pop(r.episode, None)
        self._close(r.episode)
        ep.reward = r.reward
        ep.outcome = ("agent_error" if r.error else "not_mergeable" if not ep.merges
                      else "no_call" if not ep.turns else "split" if ep.samples else "ok")
        self._end(ep, version)
        self._answer(r, 200, {"episode": r.episode, "reward": r.reward,
                              "trained": ep.outcome in TRAINED})

    def _close(self, eid: str) -> None:
        self.closed[eid] = None
        while len(self.closed) > 100_000:  # ids are kept to refuse late calls, not forever
            self.closed.popitem(last=False)

    def _expire(self, version: int) -> None:
        now = self.clock()
        for eid, ep in list(self.episodes.items()):
            if not ep.running and now - ep.last_active > self.timeout_s:
                del self.episodes[eid]
                self._close(eid)
                ep.outcome = "abandoned"
                self._end(ep, version)

    def _end(self, ep: AgentEpisode, version: int) -> None:
        self.m.endpoint_episodes.labels(ep.outcome).inc()
        group = group_of(ep.id)
        ended = self.ended.setdefault(group, [])
        ended.append(ep)
        if len(ended) < self.group_size:
            return
        del self.ended[group]
        prompts = {tuple(e.prompt) for e in ended}
        if any(e.outcome not in TRAINED for e in ended) or len(prompts) != 1:
            self.m.endpoint_groups.labels("dropped").inc()
            log.warning("%s: agent group %r dropped: %s", self.name, group,
                        "its episodes started from different prompts" if len(prompts) != 1
                        else ", ".join(sorted({e.outcome for e in ended})))
            return
        self.m.endpoint_groups.labels("trained").inc()
        self.ready.append(AgentGroup(group_key(group), ended, version))

    def take_groups(self) -> list[AgentGroup]:
        out, self.ready = self.ready, []
        return out

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class _Server(ThreadingHTTPServer):
    # Agents open many connections at once (group_size x groups in flight); the default
    # listen backlog of 5 refused some of them (the openai client's "Connection error").
    request_queue_size = 1024
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    """The endpoint's HTTP side; `endpoint` is set on a subclass per server (_handler)."""

    endpoint: Endpoint
    server_version = "asyncrl"
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: a response's headers and body are two writes; with Nagle's algorithm the
    # body waits for the client's delayed ACK of the headers (tens of ms per call).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # noqa: D401 - the metrics count requests
        log.debug("endpoint: " + fmt, *args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.endpoint.m.endpoint_requests.labels(str(status)).inc()

    def _error(self, e: ApiError) -> None:
        self.endpoint.refused(e.code)
        self._send(e.status, e.body())

    def do_GET(self):  # noqa: N802 - http.server's name
        if not self._authorized():
            return
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/v1/models"):
            return self._send(200, {"object": "list", "data": [
                {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "asyncrl"}]})
        self._error(ApiError(404, f"no route {path[:100]!r}", None, "not_found"))

    def do_POST(self):  # noqa: N802
        if not self._authorized():
            return
        try:
            episode, route = _route(self.path)
            body = self._body()
            if route == "reward":
                item = _reward_posted(episode, body)
            else:
                req = (self.endpoint.renderer.chat(body) if route == "chat"
                       else self.endpoint.renderer.completion(body))
                item = Call(req, episode, events=queue.SimpleQueue() if req.stream else None)
        except ApiError as e:
            return self._error(e)
        self.endpoint.inbox.put(item)
        if getattr(item, "events", None) is not None:
            return self._stream(item)
        if not item.done.wait(self.endpoint.timeout_s):
            return self._error(ApiError(504, "the generator did not answer in "
                                        "generator.episode_timeout_s", None, "timeout",
                                        "server_error"))
        self._send(item.status, item.body)

    def _stream(self, call: Call) -> None:
        """Server-sent events, one per chunk, in HTTP/1.1 chunked encoding (the connection
        stays open for the client's next call), then `data: [DONE]`. A refused call gets its
        error as a plain JSON answer; a client gone mid-stream costs nothing but the write."""
        timeout = self.endpoint.timeout_s
        try:
            event = call.events.get(timeout=timeout)
        except queue.Empty:
            return self._error(ApiError(504, "the generator did not answer in "
                                        "generator.episode_timeout_s", None, "timeout",
                                        "server_error"))
        if event[0] == "error":
            return self._send(event[1], event[2])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.endpoint.m.endpoint_requests.labels("200").inc()
        try:
            while event[0] == "chunk":
                self._event(json.dumps(event[1]).encode())
                event = call.events.get(timeout=timeout)
            self._event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (queue.Empty, OSError):  # the generator stopped, or the client left
            self.close_connection = True

    def _event(self, data: bytes) -> None:
        frame = b"data: " + data + b"\n\n"
        self.wfile.write(b"%X\r\n%s\r\n" % (len(frame), frame))

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), f"Bearer {self.endpoint.key}".encode()):
            return True
        self._drain()
        self._error(ApiError(401, "a valid bearer key is needed (Authorization: Bearer "
                             "<RUN_DIR/keys/endpoint.token>; `asyncrl keys` prints it)",
                             None, "invalid_api_key", "authentication_error"))
        return False

    def _drain(self) -> None:
        n = self.headers.get("Content-Length")
        if n and n.isdigit() and int(n) <= MAX_BODY_BYTES:
            self.rfile.read(int(n))
        else:
            self.close_connection = True

    def _body(self):
        n = self.headers.get("Content-Length")
        if n is None or not n.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is needed", None,
                           "length_required")
        if int(n) > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", None,
                           "too_large")
        raw = self.rfile.read(int(n))
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON", None,
                           "invalid_json") from None


def _handler(endpoint: Endpoint) -> type:
    # A client that sends less than its Content-Length, or nothing, holds its thread only
    # until generator.episode_timeout_s (the socket's timeout), never forever.
    return type("Handler", (_Handler,), {"endpoint": endpoint, "timeout": endpoint.timeout_s})


def _route(path: str) -> tuple[str | None, str]:
    """(episode id or None, "chat" | "completion" | "reward") of a POST path."""
    path = path.split("?")[0].rstrip("/")
    episode = None
    if path.startswith("/episodes/"):
        rest = path[len("/episodes/"):]
        eid, _, tail = rest.partition("/")
        if not eid or len(eid) > 128 or not all(c.isalnum() or c in "-_." for c in eid):
            raise ApiError(400, "an episode id is 1-128 letters, digits, '-', '_' or '.'",
                           None, "bad_episode")
        episode, path = eid, "/" + tail
        if path == "/reward":
            return episode, "reward"
    if path == "/v1/chat/completions":
        return episode, "chat"
    if path == "/v1/completions":
        return episode, "completion"
    raise ApiError(404, f"no route {path[:100]!r}", None, "not_found")


def _reward_posted(episode: str | None, body) -> Reward:
    if episode is None:
        raise ApiError(404, "a reward is posted to /episodes/<id>/reward", None, "not_found")
    if not isinstance(body, dict) or set(body) - {"reward"} or "reward" not in body:
        raise ApiError(400, 'the body must be {"reward": <number>}', "reward")
    r = body["reward"]
    if type(r) not in (int, float) or not np.isfinite(r):
        raise ApiError(400, "reward must be a finite number", "reward")
    return Reward(episode, float(r))

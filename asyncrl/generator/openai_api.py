"""The OpenAI API as the endpoint speaks it (asyncrl/generator/endpoint.py serves it): what a
request may hold and how its prompt is rendered (`Renderer`: OpenAI-style errors for the
rest), and the bodies of the answers: a whole response (`response`), or server-sent event
chunks for `stream: true` (`Stream`, a chunk per engine step with the text the step added).

Every answer carries, beyond the OpenAI fields, `asyncrl`: the call's prompt ids, sampled ids,
their logprobs and the policy version of each token (in a stream, on the chunk with the
finish reason).
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass

MODEL_NAME = "asyncrl"
MAX_BODY_BYTES = 8 << 20
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "n", "stream", "stream_options", "logprobs", "seed", "user", "tools",
               "tool_choice"}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
                     "stream_options", "logprobs", "seed", "user"}
ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str = "invalid_request", kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# ------------------------------------------------------------------ requests


@dataclass
class Request:
    """One checked call: the rendered prompt ids and what to answer."""

    prompt: list[int]
    max_tokens: int
    chat: bool
    logprobs: bool = False
    stream: bool = False  # answered as server-sent events, a chunk per engine step
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


class Renderer:
    """Checks a call's JSON against what the endpoint serves and renders its prompt ids."""

    def __init__(self, tok, temperature: float, max_tokens: int, encode_completion):
        self.tok, self.temperature, self.max_tokens = tok, temperature, max_tokens
        self.encode_completion = encode_completion  # text -> ids, as the task's prompts

    def chat(self, body) -> Request:
        self._common(body, CHAT_FIELDS)
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions",
                           "messages", "no_chat_template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or len(messages) > 4096:
            raise ApiError(400, "messages must be a non-empty list of messages", "messages")
        clean = [self._message(m, i) for i, m in enumerate(messages)]
        tools = body.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(
                isinstance(t, dict) for t in tools)):
            raise ApiError(400, "tools must be a list of tool descriptions", "tools")
        choice = body.get("tool_choice")
        if choice not in (None, "auto", "none"):
            raise ApiError(400, "tool_choice: only auto and none are served", "tool_choice")
        try:
            text = self.tok.apply_chat_template(clean, tools=tools or None, tokenize=False,
                                                add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template's own complaint, as a 400
            raise ApiError(400, f"the chat template cannot render these messages: {e}",
                           "messages") from None
        ids = list(self.tok.encode(text, add_special_tokens=False))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        return Request(ids, self._max_tokens(limit, "max_tokens"), True,
                       bool(body.get("logprobs")), *self._stream(body))

    def completion(self, body) -> Request:
        self._common(body, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = list(self.encode_completion(prompt))
        elif isinstance(prompt, list) and prompt and all(
                type(t) is int and 0 <= t < len(self.tok) for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids of this model",
                           "prompt")
        logprobs = body.get("logprobs")
        if logprobs is not None and (type(logprobs) is not int or not 0 <= logprobs <= 1):
            raise ApiError(400, "logprobs: 0 or 1 (the sampled token's) is served", "logprobs")
        return Request(ids, self._max_tokens(body.get("max_tokens"), "max_tokens"), False,
                       bool(logprobs), *self._stream(body))

    def _common(self, body, allowed: set[str]) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(k for k in body if k not in allowed)
        if unknown:
            raise ApiError(400, f"unknown or unsupported field(s): {', '.join(unknown)[:200]}",
                           unknown[0][:64], "unknown_field")
        if body.get("model") != MODEL_NAME:
            raise ApiError(404, f"model {str(body.get('model'))[:64]!r} is not served here; "
                           f"the policy is {MODEL_NAME!r}", "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "n must be 1: one completion per call (an episode is one "
                           "trajectory)", "n")
        t = body.get("temperature", self.temperature)
        if type(t) not in (int, float) or abs(t - self.temperature) > 1e-9:
            raise ApiError(400, f"temperature must be the run's generator.temperature "
                           f"({self.temperature:g}): the learner recomputes the behaviour "
                           "logprobs at it", "temperature")
        if body.get("top_p", 1) != 1:
            raise ApiError(400, "top_p must be 1 (the learner's logprobs are of the whole "
                           "distribution)", "top_p")

    @staticmethod
    def _stream(body) -> tuple[bool, bool]:
        """(stream, include_usage) of a request."""
        stream, options = body.get("stream", False), body.get("stream_options")
        if stream not in (True, False, None):
            raise ApiError(400, "stream must be true or false", "stream")
        if options is not None and not (
                stream and isinstance(options, dict) and set(options) <= {"include_usage"}
                and options.get("include_usage", False) in (True, False)):
            raise ApiError(400, "stream_options: {\"include_usage\": true|false} with "
                           "stream=true", "stream_options")
        return bool(stream), bool(options and options.get("include_usage"))

    def _message(self, m, i: int) -> dict:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be a message with a role in "
                           f"{', '.join(ROLES)}", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are served",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text",
                           f"messages[{i}].content")
        out = {"role": m["role"], "content": content or ""}
        for key in ("tool_calls", "tool_call_id", "name"):
            if key in m:
                out[key] = m[key]
        return out

    def _max_tokens(self, value, param: str) -> int:
        if value is None:
            return self.max_tokens
        if type(value) is not int or not 1 <= value <= self.max_tokens:
            raise ApiError(400, f"{param} must be in [1, {self.max_tokens}] "
                           "(generator.max_tokens)", param, "max_tokens_too_large")
        return value


_PROCESS_ID = uuid.uuid4().hex[:12]
_IDS = itertools.count(1)


def _response_id() -> str:
    """A response's unique id (a uuid4 per response cost 60 us of the loop's time)."""
    return f"{_PROCESS_ID}{next(_IDS):x}"


def response(tok, req: Request, seq) -> dict:
    """The whole answer to a call whose request is done (non-streaming)."""
    text = tok.decode(seq.tokens, skip_special_tokens=True)
    reason = "length" if seq.finish_reason == "length" else "stop"
    created = int(time.time())
    if req.chat:
        lp = ({"content": [{"token": tok.decode([t]), "logprob": x, "bytes": None,
                            "top_logprobs": []} for t, x in zip(seq.tokens, seq.logprobs)]}
              if req.logprobs else None)
        return {"id": f"chatcmpl-{_response_id()}", "object": "chat.completion",
                "created": created, "model": MODEL_NAME,
                "choices": [{"index": 0, "finish_reason": reason, "logprobs": lp,
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage(seq), "asyncrl": record(seq)}
    lp = ({"tokens": [tok.decode([t]) for t in seq.tokens],
           "token_logprobs": list(seq.logprobs), "top_logprobs": None,
           "text_offset": None} if req.logprobs else None)
    return {"id": f"cmpl-{_response_id()}", "object": "text_completion",
            "created": created, "model": MODEL_NAME,
            "choices": [{"index": 0, "text": text, "finish_reason": reason,
                         "logprobs": lp}], "usage": usage(seq), "asyncrl": record(seq)}


class Stream:
    """The chunks of one streaming call (loop side): each poll of the endpoint sends what the
    engine sampled since the last one; text is held back while its last character is cut in
    half (a byte-level tokenizer's partial UTF-8), so the concatenated deltas are the
    non-streamed response's text."""

    def __init__(self, tok, req: Request):
        self.tok, self.req = tok, req
        self.id = f"{'chatcmpl' if req.chat else 'cmpl'}-{_response_id()}"
        self.created = int(time.time())
        self.sent = 0  # sampled tokens sent
        self.text = ""  # text sent

    def delta(self, seq, final: bool = False) -> dict | None:
        """The chunk for what `seq` sampled since the last one, or None when nothing new."""
        n = len(seq.tokens)
        text = self.tok.decode(seq.tokens[:n], skip_special_tokens=True)
        if n == self.sent or (text.endswith("\ufffd") and not final):
            return None
        piece = text[len(self.text):] if text.startswith(self.text) else ""
        tokens, lps = seq.tokens[self.sent:n], seq.logprobs[self.sent:n]
        first = self.sent == 0
        self.sent, self.text = n, text if text.startswith(self.text) else self.text
        return self._chunk(piece, tokens, lps, None, first)

    def last(self, seq) -> list[dict]:
        """The chunks that end the stream: what is left, the finish reason with the call's
        `asyncrl` record, and the usage when stream_options.include_usage asked for it."""
        out = [c for c in (self.delta(seq, final=True),) if c is not None]
        done = self._chunk("", [], [], "length" if seq.finish_reason == "length" else "stop",
                           not out and self.sent == 0)
        done["asyncrl"] = record(seq)
        out.append(done)
        if self.req.include_usage:
            out.append({**self._head(), "choices": [], "usage": usage(seq)})
        return out

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.req.chat
                else "text_completion", "created": self.created, "model": MODEL_NAME}

    def _chunk(self, piece: str, tokens, lps, reason: str | None, first: bool) -> dict:
        tok, lp = self.tok, None
        if self.req.chat:
            if self.req.logprobs and tokens:
                lp = {"content": [{"token": tok.decode([t]), "logprob": x, "bytes": None,
                                   "top_logprobs": []} for t, x in zip(tokens, lps)]}
            delta = {"role": "assistant", "content": piece} if first else (
                {"content": piece} if piece or reason is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            if self.req.logprobs and tokens:
                lp = {"tokens": [tok.decode([t]) for t in tokens],
                      "token_logprobs": list(lps), "top_logprobs": None, "text_offset": None}
            choice = {"index": 0, "text": piece, "logprobs": lp, "finish_reason": reason}
        return {**self._head(), "choices": [choice]}


def usage(seq) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens),
            "total_tokens": len(seq.prompt) + len(seq.tokens)}


def record(seq) -> dict:
    """What asyncrl adds to an answer: the call's ids, logprobs and versions."""
    return {"prompt_token_ids": list(seq.prompt), "token_ids": list(seq.tokens),
            "logprobs": list(seq.logprobs), "versions": list(seq.versions)}

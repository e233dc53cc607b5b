"""Two faster decoders for `trajectories` frames, prototypes for benchmarks/transport.py only.

Neither is used by asyncrl; they measure what a change to `asyncrl.wire` would buy.

lean_decode       the current schema and frame, the same checks as `wire.decode` for this kind
                  (magic, CRC, field types, token range, logprobs finite and <= 0, rewards
                  finite, lengths equal), but arrays built with a cached dtype and `math.prod`
                  instead of `np.prod`, no `astype` copies, and the value checks done once on
                  the concatenation of the message's arrays instead of once per completion.
columnar_frame /  a different layout (what a schema 2 could be): one array per field for the
columnar_decode   whole message (all completion tokens, all logprobs, lengths, rewards, ...),
                  so a message holds ~8 arrays instead of 2 per completion + 1 per group, and
                  every check is one numpy call per message.
"""

from __future__ import annotations

import math
import struct
import zlib

import msgpack
import numpy as np

from asyncrl import wire

_DTYPES = {n: np.dtype(n).newbyteorder("<")
           for n in ("int32", "int64", "float32", "float64", "uint8", "float16")}


def _array(code: int, data: bytes) -> np.ndarray:
    if code != 1:
        raise wire.MessageError("bad_array", f"extension type {code}")
    n = data[0]
    dtype = _DTYPES.get(bytes(data[1:1 + n]).decode())
    if dtype is None:
        raise wire.MessageError("bad_array", "dtype not allowed")
    ndim = data[1 + n]
    shape = struct.unpack_from(f"<{ndim}I", data, 2 + n)
    off = 2 + n + 4 * ndim
    count = math.prod(shape)
    if len(data) - off != count * dtype.itemsize:
        raise wire.MessageError("bad_array", "size does not match shape")
    return np.frombuffer(data, dtype, count, off).reshape(shape)


def _unseal(frame: bytes) -> dict:
    payload = memoryview(frame)[8:]
    if frame[:4] != wire.MAGIC or zlib.crc32(payload) != struct.unpack_from("<I", frame, 4)[0]:
        raise wire.MessageError("bad_checksum", "magic or CRC")
    msg = msgpack.unpackb(payload, ext_hook=_array, raw=False, strict_map_key=True)
    if not isinstance(msg, dict) or msg.get("kind") != "trajectories":
        raise wire.MessageError("unexpected_kind", "not trajectories")
    return msg


def _is_vec(a, kinds: str) -> bool:
    return isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in kinds


def lean_decode(frame: bytes, vocab_size: int) -> list[wire.TrajectoryGroup]:
    msg = _unseal(frame)
    tokens, logprobs, groups = [], [], []
    for g in msg["groups"]:
        prompt = g["prompt_tokens"]
        if not _is_vec(prompt, "iu"):
            raise wire.MessageError("bad_array", "prompt_tokens")
        tokens.append(prompt)
        comps = []
        for c in g["completions"]:
            t, lp, r = c["tokens"], c["logprobs"], c["reward"]
            if not (_is_vec(t, "iu") and _is_vec(lp, "f") and len(t) == len(lp)):
                raise wire.MessageError("inconsistent", "tokens/logprobs")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise wire.MessageError("bad_reward", "reward")
            tokens.append(t)
            logprobs.append(lp)
            comps.append(wire.Completion(t, lp, float(r), c["finish_reason"]))
        groups.append(wire.TrajectoryGroup(g["prompt_id"], prompt, g["policy_version"], comps,
                                           g["generator"], float(g["created_at"])))
    all_tokens, all_lps = np.concatenate(tokens), np.concatenate(logprobs)
    if all_tokens.min() < 0 or all_tokens.max() >= vocab_size:
        raise wire.MessageError("bad_token", "outside the vocabulary")
    if not (np.isfinite(all_lps).all() and (all_lps <= 1e-4).all()):
        raise wire.MessageError("bad_logprob", "not finite or > 0")
    return groups


def columnar_frame(groups: list[wire.TrajectoryGroup], seq: int, incarnation: str) -> bytes:
    comps = [c for g in groups for c in g.completions]
    body = {"kind": "trajectories", "schema": 2, "policy_version": 0, "sender": "gen0",
            "incarnation": incarnation, "seq": seq,
            "prompt_ids": [g.prompt_id for g in groups],
            "prompt_tokens": np.concatenate([g.prompt_tokens for g in groups]),
            "prompt_lens": np.array([len(g.prompt_tokens) for g in groups], np.int32),
            "group_sizes": np.array([len(g.completions) for g in groups], np.int32),
            "tokens": np.concatenate([c.tokens for c in comps]),
            "logprobs": np.concatenate([c.logprobs for c in comps]),
            "lens": np.array([len(c.tokens) for c in comps], np.int32),
            "rewards": np.array([c.reward for c in comps], np.float32),
            "finish_reasons": [c.finish_reason for c in comps]}
    return wire.seal(msgpack.packb(body, default=wire._default, use_bin_type=True))


def columnar_decode(frame: bytes, vocab_size: int) -> dict:
    msg = _unseal(frame)
    t, lp, lens, p = msg["tokens"], msg["logprobs"], msg["lens"], msg["prompt_tokens"]
    if not (_is_vec(t, "iu") and _is_vec(lp, "f") and _is_vec(lens, "iu") and _is_vec(p, "iu")):
        raise wire.MessageError("bad_array", "columns")
    if len(t) != len(lp) or (lens < 0).any() or int(lens.sum()) != len(t):
        raise wire.MessageError("inconsistent", "lengths")
    if int(msg["prompt_lens"].sum()) != len(p) or int(msg["group_sizes"].sum()) != len(lens):
        raise wire.MessageError("inconsistent", "prompts or groups")
    if min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= vocab_size:
        raise wire.MessageError("bad_token", "outside the vocabulary")
    if not (np.isfinite(lp).all() and (lp <= 1e-4).all() and np.isfinite(msg["rewards"]).all()):
        raise wire.MessageError("bad_logprob", "logprobs or rewards")
    return msg

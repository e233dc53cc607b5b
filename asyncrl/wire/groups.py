"""Trajectory groups: the records, and how a message carries them as columns.

The groups of one message travel as one array per field (`group_columns`), so decoding and
checking cost a few numpy calls per message, not several Python objects per completion. Of the
columns, encode checks the types (1-D arrays of the declared dtypes, lists of bounded strings);
whether their values fit together (lengths add up, logprobs <= 0, ids in the vocabulary) is the
receiver's check alone (`parse_groups`), since those values come from the model and the tests
build such frames on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncrl.wire.fields import INT64_MAX, MAX_NAME, MAX_VERSION, MessageError, _type_name


@dataclass
class Completion:
    tokens: np.ndarray  # (T,) int32, sampled token ids
    logprobs: np.ndarray  # (T,) float32, behaviour logprob of each sampled token
    reward: float
    finish_reason: str  # "stop" | "length"
    # (T,) int64, the policy version that sampled each token (a completion generated across
    # a weight update spans several); None: every token at its group's policy_version.
    versions: np.ndarray | None = None
    # The parts the scorer made `reward` of (each reward function unweighted, a reward model's
    # score), by name; None: not given. Every completion of a message has the same names.
    reward_parts: dict[str, float] | None = None
    # (T,) uint8, where each token came from: 0 sampled by the policy (it has a behaviour
    # logprob and a version, and is trained on), 1 injected (an environment's observation,
    # a chat template's delimiters: no logprob, no loss). None: every token sampled.
    sources: np.ndarray | None = None
    # A separate sample of the group's episode `sample_of` (0-based among the group's own
    # completions), with that episode's reward: an agent's episode whose calls do not extend
    # one another travels as several samples (prime-rl's rule; generator/endpoint.py). It
    # comes after the group's own completions and takes its episode's advantage. None: the
    # group's own completion (one per episode, group_size of them).
    sample_of: int | None = None


@dataclass
class TrajectoryGroup:
    """The `group_size` completions of one prompt, sampled under one policy version."""

    prompt_id: int
    prompt_tokens: np.ndarray  # (P,) int32
    policy_version: int
    completions: list[Completion]
    generator: str = ""
    created_at: float = 0.0
    # Identity, stamped by the buffer on acceptance (asyncrl/buffer/journal.py): the sender's
    # incarnation, the message's seq in that stream, the group's index in the message.
    incarnation: str = ""
    seq: int = -1
    index: int = -1

    @property
    def episodes(self) -> list[Completion]:
        """The group's own completions, one per episode (group_size): what advantages are
        relative within; the separate samples (`sample_of`) come after them."""
        return [c for c in self.completions if c.sample_of is None]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.completions)

    @property
    def num_sampled_tokens(self) -> int:
        """The completion tokens the policy sampled (not those an environment injected)."""
        return sum(len(c.tokens) if c.sources is None else int((c.sources == 0).sum())
                   for c in self.completions)



# column -> numpy kinds allowed, 1-D. Per group: prompt_id .. group_size; per completion:
# length, reward; concatenated: prompt_tokens, tokens, logprobs.
_ARRAY_COLUMNS = {
    "prompt_id": "iu", "policy_version": "iu", "created_at": "f", "prompt_len": "iu",
    "group_size": "iu", "length": "iu", "reward": "f", "prompt_tokens": "iu", "tokens": "iu",
    "logprobs": "f", "seq": "i", "index": "i", "version_lag": "iu", "reward_parts": "f",
    "sources": "u", "sample_of": "i",
}
# column -> longest string allowed (per group: generator, incarnation; per completion:
# finish_reason)
_STRING_COLUMNS = {"generator": MAX_NAME, "incarnation": MAX_NAME, "finish_reason": 32,
                   "reward_part_names": MAX_NAME}
MAX_REWARD_PARTS = 32  # names in reward_part_names
_MAX_LENGTH = 2**31 - 1  # one prompt, one completion, one group: fits int32


def group_columns(groups: list[TrajectoryGroup]) -> dict:
    """The `groups` field: per group prompt_id, policy_version, created_at, generator,
    incarnation, seq, index, prompt_len, group_size; prompt_tokens concatenated; per
    completion length, reward, sample_of (-1: the group's own), finish_reason; tokens and
    logprobs concatenated."""
    comps = [c for g in groups for c in g.completions]

    def cat(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    return {
        "prompt_id": np.array([g.prompt_id for g in groups], np.int64),
        "policy_version": np.array([g.policy_version for g in groups], np.int64),
        "created_at": np.array([g.created_at for g in groups], np.float64),
        "generator": [g.generator for g in groups],
        "incarnation": [g.incarnation for g in groups],
        "seq": np.array([g.seq for g in groups], np.int64),
        "index": np.array([g.index for g in groups], np.int32),
        "prompt_len": np.array([len(g.prompt_tokens) for g in groups], np.int32),
        "prompt_tokens": cat([g.prompt_tokens for g in groups], "int32"),
        "group_size": np.array([len(g.completions) for g in groups], np.int32),
        "length": np.array([len(c.tokens) for c in comps], np.int32),
        "tokens": cat([c.tokens for c in comps], "int32"),
        "logprobs": cat([c.logprobs for c in comps], "float32"),
        "version_lag": cat([np.zeros(len(c.tokens), np.int32) if c.versions is None
                            else np.asarray(c.versions, np.int64) - g.policy_version
                            for g in groups for c in g.completions], "int32"),
        "sources": cat([np.zeros(len(c.tokens), np.uint8) if c.sources is None
                        else np.asarray(c.sources, np.uint8) for c in comps], "uint8"),
        "reward": np.array([c.reward for c in comps], np.float64),
        "sample_of": np.array([-1 if c.sample_of is None else c.sample_of for c in comps],
                              np.int32),
        "finish_reason": [c.finish_reason for c in comps],
        **_reward_part_columns(comps),
    }


def _reward_part_columns(comps: list[Completion]) -> dict:
    """reward_part_names, and reward_parts: one row of that many values per completion."""
    names = next((list(c.reward_parts) for c in comps if c.reward_parts), [])
    if any(list(c.reward_parts or ()) != names for c in comps):
        raise ValueError("every completion of a message must carry the same reward parts")
    return {"reward_part_names": names,
            "reward_parts": np.array([[c.reward_parts[k] for k in names] for c in comps]
                                     if names else [], np.float64).reshape(-1)}


def _typed_columns(cols: Any) -> dict:
    """Every declared column present with its type: 1-D arrays of the allowed kinds, lists of
    bounded strings. Columns not declared are ignored."""
    if type(cols) is not dict:
        raise MessageError("bad_type", f"groups is {_type_name(cols)}, not a map of columns")
    out = {}
    for key, kinds in _ARRAY_COLUMNS.items():
        if key not in cols:
            raise MessageError("missing_field", f"groups.{key}")
        a = cols[key]
        if type(a) is not np.ndarray:
            raise MessageError("bad_type", f"groups.{key} is {_type_name(a)}, not an array")
        if a.ndim != 1 or a.dtype.kind not in kinds:
            raise MessageError("bad_array", f"groups.{key} has shape {a.shape} dtype {a.dtype}")
        out[key] = a
    for key, max_len in _STRING_COLUMNS.items():
        if key not in cols:
            raise MessageError("missing_field", f"groups.{key}")
        v = cols[key]
        if type(v) is not list:
            raise MessageError("bad_type", f"groups.{key} is {_type_name(v)}, not a list")
        if not all(type(x) is str for x in v):
            raise MessageError("bad_type", f"groups.{key} holds a non-string")
        if any(len(x) > max_len for x in v):
            raise MessageError("bad_value", f"groups.{key} holds a string longer than {max_len}")
        out[key] = v
    return out


def _within(a: np.ndarray, lo: int, hi: int) -> bool:
    return len(a) == 0 or (int(a.min()) >= lo and int(a.max()) <= hi)


def _checked_columns(cols: Any, vocab_size: int | None) -> dict:
    """The columns of a `groups` field checked as a whole, in dependency order: types, then the
    bounds of single values, then the sums and counts that tie the columns together."""
    c = _typed_columns(cols)
    _check_group_columns(c)
    _check_sums(c)
    _check_values(c)
    c["versions"] = _token_versions(c)
    _check_token_ids(c, vocab_size)
    _check_samples(c)
    return c


def _check_samples(c: dict) -> None:
    """Separate samples (sample_of >= 0) come after their group's own completions (-1), at
    least one of those, and name one of them."""
    of = c["sample_of"]
    if not (of >= 0).any():
        if not _within(of, -1, -1):
            raise MessageError("bad_value", "groups.sample_of holds a value below -1")
        return
    at = 0
    for size in c["group_size"].tolist():
        rows = of[at:at + size]
        at += size
        own = int((rows == -1).sum())
        if own == 0 or not (rows[:own] == -1).all() or not _within(rows[own:], 0, own - 1):
            raise MessageError("bad_value", "groups.sample_of: a group's separate samples must "
                                            "follow its own completions and name one of them")


def _check_group_columns(c: dict) -> None:
    """Every per-group column as long as prompt_id; group sizes, prompt and completion lengths
    within bounds."""
    n_groups = len(c["prompt_id"])
    for k in ("policy_version", "created_at", "prompt_len", "group_size", "generator",
              "incarnation", "seq", "index"):
        if len(c[k]) != n_groups:
            raise MessageError("inconsistent", f"groups.{k} has {len(c[k])}, prompt_id "
                                               f"{n_groups}")
    # Bounds before sums: int64 sums of unbounded lengths can wrap around to any total.
    if not _within(c["group_size"], 1, _MAX_LENGTH):
        raise MessageError("inconsistent", f"a group has no completions or more than "
                                           f"{_MAX_LENGTH}")
    for k in ("prompt_len", "length"):
        if not _within(c[k], 0, _MAX_LENGTH):
            raise MessageError("inconsistent", f"groups.{k} outside [0, {_MAX_LENGTH}]")


def _check_sums(c: dict) -> None:
    """Group sizes add up to the per-completion columns' length, prompt and completion lengths
    to the concatenated token columns'; one row of reward parts per completion."""
    n_comps = len(c["length"])
    names = c["reward_part_names"]
    if len(names) > MAX_REWARD_PARTS or len(set(names)) != len(names):
        raise MessageError("bad_value", f"groups.reward_part_names: more than "
                                        f"{MAX_REWARD_PARTS} or repeated")
    if len(c["reward_parts"]) != n_comps * len(names):
        raise MessageError("inconsistent", f"groups.reward_parts has {len(c['reward_parts'])} "
                                           f"values, expected {n_comps} x {len(names)}")
    if int(c["group_size"].sum()) != n_comps or len(c["reward"]) != n_comps:
        raise MessageError("inconsistent", f"group sizes add up to {int(c['group_size'].sum())}, "
                                           f"length has {n_comps}, reward {len(c['reward'])}")
    if len(c["sample_of"]) != n_comps:
        raise MessageError("inconsistent", f"groups.sample_of has {len(c['sample_of'])} "
                                           f"entries, expected {n_comps}")
    if len(c["finish_reason"]) != n_comps:
        raise MessageError("inconsistent", f"groups.finish_reason has "
                                           f"{len(c['finish_reason'])} entries, expected {n_comps}")
    if int(c["prompt_len"].sum()) != len(c["prompt_tokens"]):
        raise MessageError("inconsistent", f"prompt lengths do not add up to "
                                           f"{len(c['prompt_tokens'])}")
    n_tokens = len(c["tokens"])
    if len(c["sources"]) != n_tokens:
        raise MessageError("inconsistent", f"groups.sources has {len(c['sources'])} entries, "
                                           f"tokens {n_tokens}")
    if len(c["version_lag"]) != n_tokens:
        raise MessageError("inconsistent", f"groups.version_lag has {len(c['version_lag'])} "
                                           f"entries, tokens {n_tokens}")
    if int(c["length"].sum()) != n_tokens or len(c["logprobs"]) != n_tokens:
        raise MessageError("inconsistent", f"completion lengths add up to "
                                           f"{int(c['length'].sum())}, tokens has {n_tokens}, "
                                           f"logprobs {len(c['logprobs'])}")


def _check_values(c: dict) -> None:
    """Logprobs, rewards and times finite (logprobs as float32, replacing the column), stamps
    and versions within bounds."""
    # float32 is what the learner computes with: a float64 -1e300 is -inf there.
    with np.errstate(over="ignore"):
        logprobs = c["logprobs"] = c["logprobs"].astype(np.float32, copy=False)
    if len(c["tokens"]) and not (np.isfinite(logprobs).all() and (logprobs <= 1e-4).all()):
        raise MessageError("bad_logprob", "groups.logprobs not finite or > 0")
    if not _within(c["sources"], 0, 1):
        raise MessageError("bad_value", "groups.sources holds a value other than 0 (sampled) "
                                        "or 1 (injected)")
    if not (np.isfinite(c["reward"]).all() and np.isfinite(c["reward_parts"]).all()):
        raise MessageError("bad_reward", "groups.reward or groups.reward_parts not finite")
    if not np.isfinite(c["created_at"]).all():
        raise MessageError("bad_value", "groups.created_at not finite")
    if not (_within(c["seq"], -1, INT64_MAX - 1) and _within(c["index"], -1, _MAX_LENGTH)):
        raise MessageError("bad_value", "groups.seq or groups.index negative (-1: not stamped)")
    if not _within(c["policy_version"], 0, MAX_VERSION):
        raise MessageError("bad_version", f"groups.policy_version outside [0, {MAX_VERSION}]")
    # A group's policy_version is its oldest token's (what its staleness is judged by): no
    # token is older, and none newer than the bound on versions.
    if not _within(c["version_lag"], 0, 2**31 - 1):
        raise MessageError("bad_version", "groups.version_lag negative: a token older than its "
                                          "group's policy_version")


def _token_versions(c: dict) -> np.ndarray:
    """Each token's policy version: its group's plus its lag, checked against the bound."""
    starts = np.concatenate([[0], np.cumsum(c["group_size"])[:-1]]).astype(np.int64)
    per_group = (np.add.reduceat(c["length"].astype(np.int64), starts) if len(c["prompt_id"])
                 else np.zeros(0, np.int64))
    versions = np.repeat(c["policy_version"].astype(np.int64), per_group) + c["version_lag"]
    if not _within(versions, 0, MAX_VERSION):
        raise MessageError("bad_version", f"a token's version is outside [0, {MAX_VERSION}]")
    return versions


def _check_token_ids(c: dict, vocab_size: int | None) -> None:
    top = 2**31 if vocab_size is None else vocab_size
    for name in ("tokens", "prompt_tokens"):
        if not _within(c[name], 0, top - 1):
            raise MessageError("bad_token", f"groups.{name}: token id outside [0, {top})")


def _split(a: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Consecutive slices of `a` (views); plain slicing is ~10x cheaper than np.split."""
    ends = np.cumsum(lengths).tolist()
    return [a[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]


def parse_groups(cols: Any, vocab_size: int | None = None) -> list[TrajectoryGroup]:
    """Check the columns of a `groups` field as a whole, then slice them into groups (the
    arrays are read-only views of the frame)."""
    c = _checked_columns(cols, vocab_size)
    length, group_size = c["length"], c["group_size"]
    names = c["reward_part_names"]
    parts = (c["reward_parts"].reshape(len(length), len(names)).tolist() if names
             else [None] * len(length))
    comps = [Completion(t, lp, r, f, v, dict(zip(names, p)) if p is not None else None,
                        src if src.any() else None, None if of < 0 else of)
             for t, lp, r, f, v, p, src, of in zip(
                 _split(c["tokens"].astype(np.int32, copy=False), length),
                 _split(c["logprobs"], length), c["reward"].tolist(), c["finish_reason"],
                 _split(c["versions"], length), parts, _split(c["sources"], length),
                 c["sample_of"].tolist(), strict=True)]
    ends = np.cumsum(group_size).tolist()
    return [TrajectoryGroup(pid, prompt, version, comps[end - size : end], gen, created, inc,
                            seq, index)
            for pid, prompt, version, end, size, gen, created, inc, seq, index in zip(
                c["prompt_id"].tolist(), _split(c["prompt_tokens"].astype(np.int32, copy=False),
                                                c["prompt_len"]),
                c["policy_version"].tolist(), ends, group_size.tolist(), c["generator"],
                c["created_at"].tolist(), c["incarnation"], c["seq"].tolist(),
                c["index"].tolist(), strict=True)]


@dataclass(frozen=True)
class Groups:
    """Group columns (`group_columns`). Decoding checks everything and builds the groups;
    encoding checks the column types only (see the module docstring)."""

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> Any:
        if build:
            return parse_groups(v, vocab_size)
        _typed_columns(v)
        return v


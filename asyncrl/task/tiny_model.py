"""Build the built-in models: a tiny Llama, a byte-level tokenizer, and an SFT warm start.

No model can be downloaded on the project's machines, so the default run makes its own: a
4-layer Llama (hidden 256, head dim 64, which vLLM's CPU attention supports) with a byte-level
BPE tokenizer without merges (one token per character, so digits are single tokens), trained
briefly with SFT on the task so that RL starts from a partly-right policy. The result
is a normal hub-format directory that vLLM and transformers load like any checkpoint, and it is
cached under `warm_start.cache_dir` keyed by a hash of everything that shapes it.

Three builtins (BUILTINS): `builtin:tiny-addition`, the embedded default;
`builtin:tiny-reasoning` for the reasoning task (asyncrl/task/reasoning.py): the same network
with 512 positions for its long scratchpads, and the four format tags as single tokens, so a
completion's length is its scratchpad rather than the tags' characters; and
`builtin:tiny-calculator` for the agentic calculator task (asyncrl/task/calculator.py), whose
warm start imitates whole episodes: the model's turns, each ended by EOS, are trained on, the
tool's results between them are read but not trained on, as in RL. The tags are normal
added tokens, not special ones: the generator decodes with skip_special_tokens=True and the
format rewards must still see them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from asyncrl.config import BUILTIN_MAX_POSITIONS, BUILTIN_MODEL, PRETRAINED_BUILTINS, RunConfig
from asyncrl.task import calculator, encode_prompt, load_task
from asyncrl.task.build import build_once
from asyncrl.task.reasoning import TAGS

log = logging.getLogger(__name__)
BUILD_VERSION = 1  # bump when the build recipe changes, to invalidate caches
SPECIALS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True)
class Builtin:
    """What differs between the built-in models; the rest of the network is shared."""

    positions: int  # max_position_embeddings (config.BUILTIN_MAX_POSITIONS checks prompts fit)
    added_tokens: tuple[str, ...] = ()  # single tokens after the specials, decoded as their text


BUILTINS = {
    BUILTIN_MODEL: Builtin(BUILTIN_MAX_POSITIONS[BUILTIN_MODEL]),
    "builtin:tiny-reasoning": Builtin(BUILTIN_MAX_POSITIONS["builtin:tiny-reasoning"], TAGS),
    "builtin:tiny-calculator": Builtin(BUILTIN_MAX_POSITIONS["builtin:tiny-calculator"],
                                       calculator.TAGS),
}


def build_tokenizer(out_dir: Path, added_tokens: tuple[str, ...] = ()) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    # After the specials, so pad/bos/eos keep their ids; not special, so decoding keeps them.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_tokens])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out_dir)


def build_model(vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                seed: int, positions: int = BUILTINS[BUILTIN_MODEL].positions):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


# Fields that stay out of the key at these values (the recipe without them), so a model
# built without them has one key, and one cache entry, whatever asyncrl version builds it.
_ADDED_LATER = {"task.carry_slip": 0.0, "warm.lr_schedule": "constant",
                "warm.min_lr_ratio": 0.0, "warm.seed": -1, "warm.until_loss": 0.0,
                "warm.slip_steps": 0}


def cache_key(cfg: RunConfig) -> str:
    # Only what shapes the model: task fields that change the training problems, warm start.
    # Fields and the builtin's name enter only where they matter, so that a setting that does
    # not shape the model never changes its key (nor rebuilds its cached model).
    fields = ["name", "digits", "train_size", "eval_size", "seed", "carry_slip"]
    if cfg.task.name in ("reasoning", "calculator"):
        fields += ["min_terms", "max_terms", "terms_tail"]
    if cfg.task.name == "calculator":
        fields += ["tool_skip"]
    task = {k: getattr(cfg.task, k) for k in fields}
    warm = {k: v for k, v in asdict(cfg.warm_start).items() if k != "cache_dir"}
    for name, before in _ADDED_LATER.items():
        part, key = name.split(".")
        d = task if part == "task" else warm
        if key in d and d[key] == before:
            del d[key]
    parts = {"v": BUILD_VERSION, "task": task, "warm": warm, "seed": cfg.seed}
    if cfg.model.path != BUILTIN_MODEL:
        parts["builtin"] = cfg.model.path
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def builtin_dir(cfg: RunConfig) -> Path:
    """Where the tiny builtin cfg.model.path for this config is cached (built or not)."""
    root = Path(cfg.warm_start.cache_dir).expanduser()
    return root / f"{cfg.model.path.removeprefix('builtin:')}-{cache_key(cfg)}"


def prepare_builtin(cfg: RunConfig, progress: Callable[[str], None] = print) -> Path:
    """Return the directory of the built-in model for this config, building it if needed:
    the tiny SFT models here, the pretrained ones in asyncrl/task/smollm2.py."""
    if cfg.model.path in PRETRAINED_BUILTINS:
        from asyncrl.task import smollm2

        return smollm2.prepare(cfg.warm_start.cache_dir, progress)
    out = builtin_dir(cfg)
    if (out / "asyncrl_build.json").is_file():
        progress(f"[prepare] reusing built model {out}")
        return out
    return build_once(out, lambda tmp: _build(cfg, tmp, progress))


def _build(cfg: RunConfig, out: Path, progress: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoTokenizer

    t0 = time.time()
    spec = BUILTINS[cfg.model.path]
    build_tokenizer(out, spec.added_tokens)
    tok = AutoTokenizer.from_pretrained(out)
    ws = cfg.warm_start
    seed = ws.seed if ws.seed >= 0 else cfg.seed
    model = build_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                        seed, spec.positions)
    train, held_out = load_task(cfg.task)
    progress(f"[prepare] building tiny Llama ({sum(p.numel() for p in model.parameters())/1e6:.1f}M"
             f" params), SFT {ws.steps} steps x {ws.batch_size} on {len(train)} problems")
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(sft_lr_factor, steps=ws.steps,
                                                           schedule=ws.lr_schedule,
                                                           floor=ws.min_lr_ratio))
    rng = random.Random(seed)
    batches = _sft_batches(train, ws.batch_size, rng,
                           bucket=8 if cfg.task.name in ("reasoning", "calculator") else 0)
    model.train()
    # With slip_steps the imperfect teacher (task.carry_slip) speaks only at the end: the model
    # first learns to add from exact answers, then to forget some carries.
    two_phase = ws.slip_steps > 0 and cfg.task.carry_slip > 0
    done = _sft(model, tok, batches, opt, sched, ws.steps, ws.until_loss, two_phase, t0,
                progress)
    if two_phase:
        progress(f"[prepare] {ws.slip_steps} more steps on the teacher that forgets the carry "
                 f"(task.carry_slip={cfg.task.carry_slip:g}, warm_start.slip_steps)")
        done += _sft(model, tok, batches, opt, sched, ws.slip_steps, 0.0, False, t0, progress)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "asyncrl_build.json").write_text(json.dumps(
        {"build_version": BUILD_VERSION, "key": cache_key(cfg), "sft_steps": done,
         "seconds": round(time.time() - t0, 1)}))
    progress(f"[prepare] model ready ({time.time() - t0:.0f}s)")


def _sft(model, tok, batches, opt, sched, steps: int, until_loss: float, exact: bool,
         t0: float, progress: Callable[[str], None]) -> int:
    """Up to `steps` SFT steps (fewer once the loss's 50-step average is below until_loss),
    on the exact answers or on the references; returns the steps taken."""
    import torch

    average = _MovingAverage(50)
    started = time.time()
    step = -1  # steps=0: no SFT
    for step in range(steps):
        ids, labels = _sft_batch(tok, next(batches), exact)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(),
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        reached = average.add(loss.item()) < until_loss
        if (step + 1) % 50 == 0 or step + 1 == steps or reached:
            eta = "" if until_loss else (
                f", about {(time.time() - started) / (step + 1) * (steps - step - 1):.0f}s left")
            progress(f"[prepare] sft step {step + 1}/{steps} loss {loss.item():.3f} "
                     f"(average {average.value:.3f}; {time.time() - t0:.0f}s{eta})")
        if reached:
            progress(f"[prepare] the SFT loss averaged below warm_start.until_loss="
                     f"{until_loss:g} at step {step + 1}: done")
            break
    return step + 1


class _MovingAverage:
    """The mean of the last `n` values (inf until there are n)."""

    def __init__(self, n: int):
        self.n, self.values = n, []

    def add(self, v: float) -> float:
        self.values = [*self.values[-(self.n - 1):], v]
        return self.value

    @property
    def value(self) -> float:
        return sum(self.values) / self.n if len(self.values) == self.n else float("inf")


def sft_lr_factor(step: int, steps: int, schedule: str, warmup: int = 20,
                  floor: float = 0.0) -> float:
    """The SFT learning rate at `step` as a fraction of warm_start.lr: linear warm-up over
    `warmup` steps, then constant, or a cosine from 1 at the end of warm-up down to `floor`
    (warm_start.min_lr_ratio) at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return floor + (1 - floor) * cos


def _sft_batches(train: list, batch_size: int, rng: random.Random, bucket: int = 8):
    """Endless random batches. Where the reference completions differ much in length (the
    reasoning task's scratchpads), `bucket` batches are drawn at once and split by length, so
    a batch is not padded to its longest member: about 3x fewer tokens computed per step
    (bucket=0: plain draws)."""
    if not bucket:
        while True:  # the embedded default's batches, exactly as they have always been drawn
            yield rng.sample(train, batch_size)
    while True:
        draw = sorted(rng.sample(train, min(len(train), batch_size * bucket)),
                      key=lambda p: len(p.reference))
        chunks = [draw[i : i + batch_size] for i in range(0, len(draw), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def _sft_batch(tok, problems, exact: bool = False):
    """(ids, labels) of a batch: the prompt, then the reference (the exact answer where a
    problem has none, or with `exact`)."""
    import torch

    seqs, labels = [], []
    for p in problems:
        prompt = encode_prompt(tok, p.prompt)
        if calculator.SEP in p.reference:  # an episode: the model's turns, then the tool's
            ids, lab = list(prompt), [-100] * len(prompt)
            for text, by_model in calculator.segments(p.reference):
                part = tok.encode(text, add_special_tokens=False)
                part = part + [tok.eos_token_id] if by_model else part
                ids += part
                lab += part if by_model else [-100] * len(part)
            seqs.append(ids)
            labels.append(lab)
            continue
        target = p.answer if exact else (p.reference or p.answer)
        answer = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab  # (B, T) each

"""`asyncrl train-rm CONFIG`: a reward model from preference pairs or scored responses.

The model is the base causal LM (rm.base, else model.path: the policy's base) with a scalar
head on its last token's hidden state (transformers' *ForSequenceClassification with one
label, whose head starts at random); every parameter trains. The pair-wise loss is the
notes' Bradley-Terry one, -log sigmoid(r(x, y_w) - r(x, y_l) - margin); the point-wise loss
is the squared error to the score. Held-out accuracy (the share of held-out pairs the model
orders as labelled) is printed every rm.eval_interval steps with an ETA and plotted (rm.png).

Written to the output directory: the model in hub format (config.json with num_labels 1
and pad_token_id, safetensors, the tokenizer; transformers' AutoModelForSequenceClassification
and vLLM's pooling runner load it), rm_metrics.jsonl (one row per evaluation), rm.png and
train_rm.json (the data report and the final held-out accuracy).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from asyncrl.rm import encode, render
from asyncrl.rm.data import Pair, RmData, RmDataError, Scored, read_rm_data


def load_data(cfg, policy_dir: str, progress) -> tuple[RmData, list, str]:
    """(training data, held-out rows, where they came from)."""
    if cfg.rm.data.startswith("builtin:"):
        from asyncrl.rm.gold import make_preferences

        train, held_out = make_preferences(cfg, policy_dir, progress)
        return RmData("pairwise", train), held_out, cfg.rm.data
    data = read_rm_data(cfg.rm.data, cfg.rm.loss, cfg.rm.margin)
    prompts = sorted({r.prompt for r in data.rows})
    rng = random.Random(f"{cfg.seed}:rm-split")
    held = set(rng.sample(prompts, max(1, round(len(prompts) * cfg.rm.eval_fraction))))
    if len(held) == len(prompts):
        raise RmDataError(f"rm.data={cfg.rm.data!r}: {len(prompts)} distinct prompt(s), too "
                          "few to hold some out by prompt and train on the rest")
    train = RmData(data.kind, [r for r in data.rows if r.prompt not in held], data.bad)
    return train, [r for r in data.rows if r.prompt in held], cfg.rm.data


def drop_long(data: RmData, tok, max_length: int) -> RmData:
    """Rows whose rendered text exceeds max_length tokens are counted and dropped."""
    keep = []
    for row in data.rows:
        texts = _texts(tok, [row], data.kind)
        if max(len(x) for x in encode(tok, texts)["input_ids"]) > max_length:
            data.bad[f"over {max_length} tokens"] += 1
        else:
            keep.append(row)
    data.rows = keep
    return data


def _texts(tok, rows, kind: str) -> list[str]:
    if kind == "pairwise":
        return [render(tok, r.prompt, r.chosen) for r in rows] + \
            [render(tok, r.prompt, r.rejected) for r in rows]
    return [render(tok, r.prompt, r.response) for r in rows]


def scores(model, tok, texts: list[str], batch: int = 64):
    """The model's scalar for each text (a tensor with gradient when the model trains)."""
    import torch

    out = []
    for i in range(0, len(texts), batch):
        enc = encode(tok, texts[i:i + batch], return_tensors="pt", padding=True)
        out.append(model(**enc).logits[:, 0])
    return torch.cat(out)


def loss_of(model, tok, rows, kind: str):
    import torch
    import torch.nn.functional as F

    r = scores(model, tok, _texts(tok, rows, kind), batch=len(rows) * 2)
    if kind == "pairwise":  # the chosen rows' scores, then the rejected rows'
        n = len(rows)
        margin = torch.tensor([row.margin for row in rows])
        return -F.logsigmoid(r[:n] - r[n:] - margin).mean()
    return F.mse_loss(r, torch.tensor([row.score for row in rows]))


def held_out_accuracy(model, tok, rows) -> float:
    """The share of held-out pairs ordered as labelled (pairs: chosen over rejected; scored
    rows: every two rows of one prompt with different scores)."""
    import torch

    pairs = rows if rows and isinstance(rows[0], Pair) else _scored_pairs(rows)
    if not pairs:
        return float("nan")
    with torch.inference_mode():
        r = scores(model, tok, _texts(tok, pairs, "pairwise"))
    n = len(pairs)
    return float((r[:n] > r[n:]).float().mean())


def _scored_pairs(rows: list[Scored]) -> list[Pair]:
    by_prompt: dict[str, list[Scored]] = {}
    for r in rows:
        by_prompt.setdefault(r.prompt, []).append(r)
    pairs = []
    for group in by_prompt.values():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a.score != b.score:
                    hi, lo = (a, b) if a.score > b.score else (b, a)
                    pairs.append(Pair(a.prompt, hi.response, lo.response))
    return pairs


def load_base(base: str):
    """The base causal LM as a one-label sequence classifier, and its tokenizer (with a pad
    token: the classifier finds each row's last token by it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"rm.base={base!r} has no config.json (a hub-format causal LM)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new head "MISSING": expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, pad_token_id=tok.pad_token_id, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    return model, tok


def train_reward_model(cfg, out: Path, progress: Callable[[str], None] = print,
                       data: tuple[RmData, list, str] | None = None) -> dict:
    """Train, evaluate and write the reward model to `out`; the summary (train_rm.json).
    `data`: (training data, held-out rows, their name), else load_data's."""
    import torch
    from transformers.utils import logging as hf_logging

    from asyncrl.task.tiny_model import sft_lr_factor

    hf_logging.disable_progress_bar()  # the progress is ours: a line per evaluation, an ETA
    base = cfg.rm.base or cfg.model.path
    model, tok = load_base(base)
    data, held_out, source = data or load_data(cfg, cfg.model.path, progress)
    max_length = cfg.rm.max_length or model.config.max_position_embeddings
    data = drop_long(data, tok, max_length)
    if not data.rows:
        raise RmDataError(f"rm.data={source!r}: no usable row ({data.report()})")
    progress(f"[train-rm] {source}: {data.report()}; {len(held_out)} held out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rm.lr, weight_decay=cfg.rm.weight_decay)
    log = (out / "rm_metrics.jsonl").open("w")
    history, t0, losses = [], time.monotonic(), []
    accuracy = _evaluate(model, tok, held_out, 0, losses, history, log, t0, cfg, progress)
    model.train()
    for step in range(1, cfg.rm.steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.rm.lr * sft_lr_factor(step - 1, cfg.rm.steps, "cosine")
        batch = rng.sample(data.rows, min(cfg.rm.batch_size, len(data.rows)))
        loss = loss_of(model, tok, batch, data.kind)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % cfg.rm.eval_interval == 0 or step == cfg.rm.steps:
            accuracy = _evaluate(model, tok, held_out, step, losses, history, log, t0, cfg,
                                 progress)
            model.train()
    log.close()
    return _write(model, tok, out, cfg, source, data, held_out, accuracy, history)


def _evaluate(model, tok, held_out, step, losses, history, log, t0, cfg, progress) -> float:
    model.eval()
    accuracy = held_out_accuracy(model, tok, held_out)
    recent = losses[-cfg.rm.eval_interval:]
    row = {"step": step, "loss": sum(recent) / len(recent) if recent else None,
           "eval_accuracy": accuracy, "seconds": round(time.monotonic() - t0, 2)}
    history.append(row)
    log.write(json.dumps(row) + "\n")
    log.flush()
    left = (cfg.rm.steps - step) * row["seconds"] / step if step else None
    progress(f"[train-rm] step {step}/{cfg.rm.steps}"
             + (f" loss {row['loss']:.3f}" if row["loss"] is not None else "")
             + f" | held-out accuracy {accuracy:.1%} | {row['seconds']:.0f}s"
             + (f", about {left:.0f}s left" if left is not None else ""))
    return accuracy


def _write(model, tok, out, cfg, source, data, held_out, accuracy, history) -> dict:
    from asyncrl.plots import plot_reward_model

    model.config.num_labels = 1
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    summary = {"data": source, "kind": data.kind, "train_rows": len(data.rows),
               "skipped": dict(data.bad), "held_out_rows": len(held_out),
               "held_out_accuracy": accuracy, "steps": cfg.rm.steps,
               "base": cfg.rm.base or cfg.model.path}
    (out / "train_rm.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_reward_model(history, out / "rm.png")
    return summary


def exact_base(cfg, policy: str, progress: Callable[[str], None] = print) -> str:
    """rm.base=builtin:policy-exact: the tiny builtin `policy` (model.path before it was
    resolved to a directory) built on exact answers alone, built once and cached like the
    policy: the same network, task and warm start with task.carry_slip and
    warm_start.slip_steps off. The SFT policy is that model after the slipping teacher."""
    from asyncrl.task.tiny_model import prepare_builtin

    return str(prepare_builtin(_exact(cfg, policy), progress))


def exact_base_dir(cfg, policy: str) -> str:
    """Where exact_base caches that model, built or not."""
    from asyncrl.task.tiny_model import builtin_dir

    return str(builtin_dir(_exact(cfg, policy)))


def _exact(cfg, policy: str):
    import copy

    exact = copy.deepcopy(cfg)
    exact.model.path = policy
    exact.task.carry_slip, exact.warm_start.slip_steps = 0.0, 0
    return exact

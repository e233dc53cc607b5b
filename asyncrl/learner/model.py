"""The learner's view of the policy: a transformers causal LM, its token logprobs, greedy eval."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from asyncrl.algo.losses import entropy_from_logits
from asyncrl.learner.packing import Packing, pack, packed_logits
from asyncrl.rewards import correctness_reward
from asyncrl.task import Problem, encode_prompt

if TYPE_CHECKING:
    from collections.abc import Callable

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_for(device_type: str) -> str:
    """Eager attention on CPU: the same numerics on every PyTorch build, and vLLM is compared
    against it. On CUDA, FlashAttention-2 where it is installed, else SDPA (both take packed
    rows by their position ids, asyncrl/learner/packing.py)."""
    if device_type != "cuda":
        return "eager"
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def load_critic(path: str | Path, dtype: str = "float32", device_type: str = "cpu"):
    """A value model: the policy's backbone with a fresh one-output head per token."""
    from transformers import AutoModelForTokenClassification

    critic = AutoModelForTokenClassification.from_pretrained(
        Path(path).expanduser(), num_labels=1, dtype=_DTYPES[dtype])
    critic.config._attn_implementation = attention_for(device_type)
    return without_dropout(critic)


def load_policy(path: str | Path, dtype: str = "float32", device_type: str = "cpu"):
    """(model, tokenizer) from a hub-format directory, with a clear error if it is not one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    model.config._attn_implementation = attention_for(device_type)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return without_dropout(model), tok


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout off. With dropout in training mode two forwards of one policy disagree, so
    the PPO ratio is not 1 on-policy, and the value head (transformers gives token
    classification heads dropout 0.1 unless the config says otherwise) adds noise to GAE."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in ("attention_dropout", "dropout"):  # rates read at each functional call
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    for key in ("attention_dropout", "hidden_dropout", "classifier_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return model


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     temperature: float, with_entropy: bool = False,
                     packing: Packing | None = None, chunk_tokens: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each next token under softmax(logits / temperature), (B, T-1), and the
    policy's entropy at each position (B, T-1) when asked.

    Dividing by the sampling temperature makes these the logprobs of the distribution the
    generator sampled from (vLLM's processed logprobs), so the ratio starts at 1 on-policy.
    With a `packing` of these rows (packing.py) the model runs on the packed rows and the results
    are put back into the padded layout, 0 after each sequence's end.

    chunk_tokens > 0: the lm_head runs on that many positions at a time inside the model's
    forward (token_logprob_head), so the (positions x vocab) float32 logits never exist at once
    (learner.logprob_chunk_tokens). The model's own forward is still the one called, so DDP and
    FSDP hooks run as usual.
    """
    if chunk_tokens > 0:
        if packing is not None:
            p = packing
            with token_logprob_head(model, lambda h: h[p.row, p.col],
                                    input_ids[p.seq, p.pos + 1], temperature, chunk_tokens,
                                    with_entropy):
                out = model(input_ids=p.input_ids, position_ids=p.position_ids,
                            use_cache=False).logits  # (N, 2)
            return p.unpack(out[:, 0]), p.unpack(out[:, 1]) if with_entropy else None
        b, t = input_ids.shape
        with token_logprob_head(model, lambda h: h[:, :-1].reshape(b * (t - 1), -1),
                                input_ids[:, 1:].reshape(-1), temperature, chunk_tokens,
                                with_entropy):
            out = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (N, 2)
        out = out.reshape(b, t - 1, 2)
        return out[..., 0], out[..., 1] if with_entropy else None
    if packing is not None:
        p = packing
        logits = packed_logits(model, p).float() / temperature  # (N, V)
        targets = input_ids[p.seq, p.pos + 1]
        logprobs = torch.gather(F.log_softmax(logits, dim=-1), 1, targets.unsqueeze(-1))
        entropy = entropy_from_logits(logits) if with_entropy else None
        return p.unpack(logprobs.squeeze(-1)), None if entropy is None else p.unpack(entropy)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    targets = input_ids[:, 1:]  # (B, T-1)
    logprobs = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits.float() / temperature) if with_entropy else None
    return logprobs, entropy


def chunked_token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: float, chunk_tokens: int, with_entropy: bool
                           ) -> torch.Tensor:
    """[logprob of target, entropy (0 unless asked)] at each position, (N, 2), from the final
    hidden states (N, H), `chunk_tokens` positions at a time. With gradients each chunk is
    recomputed in the backward pass (activation checkpointing), so only one chunk's logits are
    alive at a time there too."""
    n = hidden.shape[0]

    def one(h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = head(h).float() / temperature  # (n, V)
        lp = torch.gather(F.log_softmax(logits, dim=-1), 1, tgt.unsqueeze(-1)).squeeze(-1)
        ent = entropy_from_logits(logits) if with_entropy else torch.zeros_like(lp)
        return torch.stack([lp, ent], dim=-1)  # (n, 2)

    if n <= chunk_tokens:
        return one(hidden, targets)
    recompute = torch.is_grad_enabled()
    outs = []
    for s in range(0, n, chunk_tokens):
        h, tgt = hidden[s : s + chunk_tokens], targets[s : s + chunk_tokens]
        outs.append(torch.utils.checkpoint.checkpoint(one, h, tgt, use_reentrant=False)
                    if recompute else one(h, tgt))
    return torch.cat(outs)


class _LogprobHead(torch.nn.Module):
    """Takes the lm_head's place for one forward: hidden (B, T, H) -> (N, 2)."""

    def __init__(self, head, select, targets, temperature, chunk_tokens, with_entropy):
        super().__init__()
        self.head = head
        self.select, self.targets, self.temperature = select, targets, temperature
        self.chunk_tokens, self.with_entropy = chunk_tokens, with_entropy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return chunked_token_logprobs(self.head, self.select(hidden), self.targets,
                                      self.temperature, self.chunk_tokens, self.with_entropy)


@contextlib.contextmanager
def token_logprob_head(model, select, targets: torch.Tensor, temperature: float,
                       chunk_tokens: int, with_entropy: bool):
    """Within this context the model's forward returns [logprob, entropy] per selected position
    as its `logits`, computed chunk by chunk (chunked_token_logprobs) inside the forward, where
    DDP and FSDP expect the lm_head's weight to be used. The same lm_head module (and its tied
    weight) does the work; it is put back on exit."""
    from asyncrl.learner.shard import unwrap

    inner = unwrap(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(_LogprobHead(head, select, targets, temperature, chunk_tokens,
                                             with_entropy))
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


def critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  packing: Packing | None = None) -> torch.Tensor:
    """The value model's estimate at each position that predicts a token, (B, T-1)."""
    if packing is not None:
        return packing.unpack(packed_logits(critic, packing)[:, 0])
    return critic(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, 0]


@torch.no_grad()
def check_packing(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  completion_mask: torch.Tensor, pack_row_tokens: int,
                  tolerance: float = 1e-2) -> float:
    """Packed and padded logprobs of the completion tokens must agree; returns the largest
    difference. A model whose attention ignores where the position ids restart would let packed
    sequences see each other: that is an error naming the setting, not a silent wrong loss."""
    padded, _ = forward_logprobs(model, input_ids, attention_mask, 1.0)
    packed, _ = forward_logprobs(model, input_ids, attention_mask, 1.0,
                                 packing=pack(input_ids, attention_mask, pack_row_tokens))
    worst = float(((padded - packed).abs() * completion_mask).max()) if padded.numel() else 0.0
    if not worst <= tolerance:
        raise RuntimeError(
            f"learner.pack_row_tokens={pack_row_tokens}: packed and padded logprobs differ by "
            f"{worst:.3g} (> {tolerance}) on the first batch, so this model's attention does not "
            "keep packed sequences apart; set learner.pack_row_tokens=0")
    return worst


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    return forward_logprobs(model, input_ids, attention_mask, temperature)[0]


@torch.no_grad()
def greedy_accuracy(model, tok, problems: list[Problem], max_tokens: int,
                    reward: Callable[[str, str], float] = correctness_reward,
                    chat_template: bool = False, batch_size: int = 256,
                    context: list[dict[str, str]] | None = None) -> float:
    """Mean reward (1 = correct) of greedy completions on `problems` (left-padded batches)."""
    was_training = model.training
    model.eval()
    correct = 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [encode_prompt(tok, p.prompt, chat_template, context) for p in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for j, p in enumerate(chunk):
            text = tok.decode(out[j, width:], skip_special_tokens=True)
            correct += reward(text, p.answer)
    model.train(was_training)
    return correct / max(1, len(problems))

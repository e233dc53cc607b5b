"""Reward models: trained on preferences or scores (`asyncrl train-rm`), scored in the loop.

    data.py    preference pairs and scored responses from JSONL, bad rows counted by reason
    gold.py    the built-in preference data: the SFT policy's own samples on the addition
               task, labelled by a hidden gold reward with Bradley-Terry noise
    train.py   a causal LM with a scalar head on its last token, the notes' pair-wise loss
               (log sigma(r(x, y_w) - r(x, y_l) - margin)) or a point-wise one, held-out
               accuracy while it trains; written as a hub-format sequence-classification
               directory with one label (transformers and vLLM's pooling runner load it)

docs/rlhf.md says how to train one and use it.
"""

from __future__ import annotations


def render(tokenizer, prompt: str, response: str) -> str:
    """A (prompt, response) pair as the reward model reads it: the chat template's user and
    assistant turns when the tokenizer has one, else prompt + response. Training and every
    scorer use this and `encode`, so they read the same tokens."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}],
                                             tokenize=False)
    return prompt + response


def encode(tokenizer, texts: list[str], **kwargs):
    """Rendered texts to token ids (a chat template already wrote the special tokens)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(texts, add_special_tokens=not templated, **kwargs)

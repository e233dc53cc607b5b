"""Tasks (prompts with verifiable answers) and the built-in tiny model."""

from __future__ import annotations

from typing import Any

from asyncrl.task.addition import Problem, correctness_reward, make_problems

__all__ = ["Problem", "correctness_reward", "encode_prompt", "load_task"]


def load_task(name: str, digits: int, train_size: int, eval_size: int, seed: int
              ) -> tuple[list[Problem], list[Problem]]:
    if name != "addition":
        raise ValueError(f"unknown task {name!r}")
    return make_problems(digits, train_size, eval_size, seed)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt token ids, identical in generator and learner: BOS (when the tokenizer has one)
    then the text. Generators pass these ids to vLLM directly, so both sides see the same ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)

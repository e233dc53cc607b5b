"""Tasks (prompts with verifiable answers) and the built-in tiny model."""

from __future__ import annotations

from typing import Any

from asyncrl.task.addition import Problem, correctness_reward, make_problems

__all__ = ["Problem", "correctness_reward", "encode_prompt", "load_task"]


def load_task(task: Any) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems for a TaskConfig."""
    if task.name == "addition":
        return make_problems(task.digits, task.train_size, task.eval_size, task.seed)
    if task.name == "reasoning":
        from asyncrl.task.reasoning import make_problems as make_reasoning

        return make_reasoning(task.digits, task.min_terms, task.max_terms, task.terms_tail,
                              task.train_size, task.eval_size, task.seed)
    if task.name == "word_problems":
        from asyncrl.task.word_problems import make_problems as make_word_problems

        return make_word_problems(task.digits, task.train_size, task.eval_size, task.seed)
    if task.name == "dataset":
        from asyncrl.task.dataset import load_dataset

        return load_dataset(task.path, task.prompt_field, task.answer_field, task.eval_size,
                            task.seed)
    raise ValueError(f"unknown task {task.name!r}")


def encode_prompt(tokenizer: Any, text: str, chat_template: bool = False) -> list[int]:
    """Prompt token ids, identical in generator and learner. With chat_template the text is
    the user turn of the tokenizer's chat template (instruct models); otherwise BOS (when the
    tokenizer has one) then the text. Generators pass these ids to vLLM directly."""
    if chat_template:
        # Render to text, then encode: the tokenized return type differs between versions.
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)

"""Tasks (prompts with verifiable answers) and the built-in tiny model."""

from __future__ import annotations

from typing import Any

from asyncrl.task.addition import Problem, make_problems

__all__ = ["Problem", "chat_context", "encode_prompt", "load_task"]


def load_task(task: Any) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems for a TaskConfig."""
    if task.name == "addition":
        return make_problems(task.digits, task.train_size, task.eval_size, task.seed,
                             task.carry_slip)
    if task.name == "reasoning":
        from asyncrl.task.reasoning import make_problems as make_reasoning

        return make_reasoning(task.digits, task.min_terms, task.max_terms, task.terms_tail,
                              task.train_size, task.eval_size, task.seed, task.carry_slip)
    if task.name == "calculator":
        from asyncrl.task.calculator import make_problems as make_calculator

        return make_calculator(task.digits, task.min_terms, task.max_terms, task.terms_tail,
                               task.train_size, task.eval_size, task.seed, task.tool_skip,
                               task.carry_slip)
    if task.name == "word_problems":
        from asyncrl.task.word_problems import make_problems as make_word_problems

        return make_word_problems(task.digits, task.train_size, task.eval_size, task.seed)
    if task.name == "dataset":
        from asyncrl.task.dataset import load_dataset

        return load_dataset(task.path, task.prompt_field, task.answer_field, task.eval_size,
                            task.seed)
    raise ValueError(f"unknown task {task.name!r}")


def chat_context(task: Any) -> list[dict[str, str]]:
    """The chat turns before each prompt's user turn, from a TaskConfig: the system prompt
    (task.system_prompt) and the worked examples (task.chat_examples, alternately user and
    assistant turns), as the GRPO demo gives its model the answer layout."""
    turns = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    roles = ("user", "assistant")
    return turns + [{"role": roles[i % 2], "content": t}
                    for i, t in enumerate(task.chat_examples)]


def encode_prompt(tokenizer: Any, text: str, chat_template: bool = False,
                  context: list[dict[str, str]] | None = None,
                  tools: list[dict] | None = None) -> list[int]:
    """Prompt token ids, identical in generator and learner. With chat_template the text is
    the user turn of the tokenizer's chat template (instruct models), after the `context`
    turns (chat_context), with `tools` (OpenAI-style function descriptions, Tool.schema())
    rendered as the template renders tools, or, for a template that ignores them, in the
    system turn (`tools_system_text`); otherwise BOS (when the tokenizer has one) then the
    text. Generators pass these ids to vLLM directly."""
    if chat_template:
        # Render to text, then encode: the tokenized return type differs between versions.
        messages = [*(context or []), {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        if tools:
            with_tools = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                       add_generation_prompt=True)
            rendered = with_tools if with_tools != rendered else tokenizer.apply_chat_template(
                with_system_tools(messages, tools), add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def tools_system_text(tools: list[dict]) -> str:
    """The tools described in a system turn, for chat templates that do not render tools
    themselves: each function's JSON description, and the call format the environments parse
    (asyncrl.env.parse_call), as tool-calling chat templates write them."""
    import json

    lines = "\n".join(json.dumps(t, sort_keys=True) for t in tools)
    return ("You can call these tools. Their descriptions, one JSON object per line:\n"
            f"<tools>\n{lines}\n</tools>\n"
            "To call one, write a JSON object with its name and arguments inside "
            "<tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments>}}\n</tool_call>')


def with_system_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tools' text at the end of the system turn (one is added when
    there is none)."""
    text = tools_system_text(tools)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]

"""The built-in calculator environment: long sums, a calculator tool, several turns.

The problem is a sum of k terms (the reasoning task's, `17+5+33+8=`). Each model turn either
calls the calculator, or gives the answer, `<answer>63</answer>`, which ends the episode. The
calculator has a memory, like a desk calculator's: `<calc>+17</calc>` adds 17 to the last
result (0 at first) and answers `<result>17</result>`; `<calc>17+5</calc>` adds two numbers
(and remembers the sum). The reward is 1 when the answer is the sum, else 0. Adding the terms
one by one takes k calls and an answer: k + 1 turns.

The tool's argument comes from the model and is never evaluated as code: it must be `+b` or
`a+b` with non-negative integers (at most `max_digits` digits each); anything else is
answered with an error result, as a real calculator answers bad input, and counted
(`tool_errors`). A turn with neither a call nor an answer is answered with an error too; every
turn that does not answer counts as a call (`tool_calls`).

Chat models call it as chat templates with tools write calls (its `add` tool is in their
prompt, env.tools_in_prompt): `<tool_call>{"name": "add", "arguments": {"a": 17, "b": 5}}
</tool_call>`, checked against the tool's schema, the result remembered the same way.
"""

from __future__ import annotations

import re

from asyncrl.env import Step, Tool, parse_call

_ANSWER = re.compile(r"<answer>\s*(-?\d{1,40})\s*</answer>")
_CALC = re.compile(r"<calc>(.*?)</calc>", re.S)
_SUM = re.compile(r"\s*(\d*)\s*\+\s*(\d+)\s*")


def add(a: int, b: int) -> int:
    return a + b


class Calculator:
    def __init__(self, max_digits: int = 12):
        self.max_digits = max_digits
        self.tools = [Tool("add", "The sum of two non-negative integers.",
                           {"type": "object", "properties": {"a": {"type": "integer"},
                                                             "b": {"type": "integer"}},
                            "required": ["a", "b"]}, add)]
        self.answer: str | None = None
        self.given: str | None = None
        self.memory = 0  # the last result
        self.tool_calls = self.tool_errors = 0

    def reset(self, problem) -> str:
        self.answer, self.given, self.memory = str(problem.answer).strip(), None, 0
        self.tool_calls = self.tool_errors = 0
        return problem.prompt

    def step(self, text: str) -> Step:
        m = _ANSWER.search(text)
        if m is not None:
            self.given = m.group(1)
            return Step(done=True)
        self.tool_calls += 1  # every turn that does not answer tries the tool
        call = parse_call(text)
        if call is not None:
            return Step(f"<result>{self._tool(call)}</result>\n")
        m = _CALC.search(text)
        if m is None:
            self.tool_errors += 1
            return Step("<result>error: call <calc>a+b</calc> or answer <answer>n</answer>"
                        "</result>\n")
        return Step(f"<result>{self._calc(m.group(1))}</result>\n")

    def _tool(self, call: tuple[str, dict] | str) -> str:
        if isinstance(call, str) or call[0] != "add":  # malformed, or a tool it does not have
            self.tool_errors += 1
            return call if isinstance(call, str) else f"error: no tool named {call[0]!r}"
        args = call[1]
        if any(type(args.get(k)) is not int or not 0 <= args[k] < 10 ** self.max_digits
               for k in ("a", "b") if k in args):
            self.tool_errors += 1
            return (f"error: add takes integers a and b of at most {self.max_digits} digits, "
                    "not negative")
        result = self.tools[0].call(args)  # names missing and unknown arguments
        if result.startswith("error"):
            self.tool_errors += 1
        else:
            self.memory = int(result)
        return result

    def _calc(self, expr: str) -> str:
        m = _SUM.fullmatch(expr)
        if m is None or max(len(m.group(1)), len(m.group(2))) > self.max_digits:
            self.tool_errors += 1
            return f"error: give +b or a+b, numbers of at most {self.max_digits} digits"
        a = int(m.group(1)) if m.group(1) else self.memory
        result = self.tools[0].call({"a": a, "b": int(m.group(2))})
        self.memory = int(result)
        return result

    def score(self) -> float:
        return float(self.given is not None and self.given == self.answer)

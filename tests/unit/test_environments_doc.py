"""docs/environments.md's example environment, run as written: it loads by import path,
answers malformed turns, ends on the right guess and scores; and the documented command's
config loads."""

import re
import sys

import pytest

from asyncrl.config import load_config
from asyncrl.env import load_environment
from asyncrl.task.addition import Problem
from tests.conftest import ROOT


@pytest.fixture
def guess_env(tmp_path, monkeypatch):
    doc = (ROOT / "docs" / "environments.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "guess_env.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("guess_env", None)


def test_the_documented_environment_runs_an_episode(guess_env):
    spec = load_environment("guess_env:Guess")
    env = spec.make()
    assert "between 1 and 100" in env.reset(Problem(0, "1+1=", "41"))
    assert env.step("<guess>50</guess>").observation == "<result>lower</result>\n"
    assert env.step("I think it is fifty").observation.startswith("<result>say")
    assert env.step("<guess>10</guess>").observation == "<result>higher</result>\n"
    last = env.step("<guess>42</guess>")
    assert last.done and env.score() == pytest.approx(1 / 3)


def test_the_documented_command_loads(guess_env):
    doc = (ROOT / "docs" / "environments.md").read_text()
    command = re.search(r"```bash\n(.*?)```", doc, re.S).group(1).replace("\\\n", " ")
    args = command.split()
    assert args[:2] == [".venv/bin/asyncrl", "run"]
    cfg = load_config(ROOT / args[2], args[3:])
    assert cfg.env.name == "guess_env:Guess" and cfg.generator.max_turns == 6

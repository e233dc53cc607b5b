"""The package's shape: no import cycle, and every reader of a run's JSON-lines files survives
a torn last line (a process killed mid-write)."""

import ast
import json
from pathlib import Path

from asyncrl.jsonl import read_jsonl
from tests.conftest import ROOT

PACKAGE = ROOT / "asyncrl"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the asyncrl modules it imports anywhere in it (function-local imports too:
    a cycle held together by imports inside functions is still a cycle)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("asyncrl")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("asyncrl"):
                deps |= {owner(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = deps - {None, name, "asyncrl"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_sees_function_local_imports():
    graph = import_graph()
    assert "asyncrl.runner" in graph["asyncrl.cli"]  # imported inside the command functions
    assert "asyncrl.launcher" in graph["asyncrl.runner"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ------------------------------------------------------------------ torn last lines

STEP = {"staleness_mean": 0.5, "tokens_per_s": 100.0, "samples_trained": 64,
        "stale_dropped_total": 0, "staleness_tokens": {"0": 10}, "is_ess": 1.0}
ROWS = [{"step": 0, "eval_accuracy": 0.5, "elapsed_s": 0.0},
        {"step": 1, "reward_mean": 0.4, "elapsed_s": 5.0, "loss": 0.1, **STEP},
        {"step": 2, "reward_mean": 0.6, "eval_accuracy": 0.7, "elapsed_s": 10.0, "loss": 0.2,
         **STEP}]


def write_torn(path: Path, rows=ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')
    return path


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    assert read_jsonl(write_torn(tmp_path / "metrics.jsonl")) == ROWS
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_plot_survives_a_torn_last_line(tmp_path):
    from asyncrl.cli import main

    write_torn(tmp_path / "metrics.jsonl")
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_run_summary_survives_a_torn_last_line(tmp_path):
    from asyncrl.runner import summary

    write_torn(tmp_path / "metrics.jsonl")
    lines = []
    summary(tmp_path, lines.append)
    assert lines == ["[run] held-out accuracy: SFT 50.0% -> step 2 70.0% (+20.0 points)"]


def test_launcher_progress_survives_a_torn_last_line(tmp_path):
    from asyncrl.launcher import _Progress

    lines = []
    progress = _Progress(write_torn(tmp_path / "metrics.jsonl"), 3, lines.append)
    progress.poll()
    assert progress.shown == 2 and any("[step 2/3]" in x for x in lines), lines
    with (tmp_path / "metrics.jsonl").open("a") as f:  # the row completes: now it is shown
        f.write('ard_mean": 0.8, "eval_accuracy": 0.8, "elapsed_s": 15.0, "staleness_mean": 0, '
                '"tokens_per_s": 1}\n')
    progress.poll()
    assert progress.shown == 3, lines


def test_study_report_survives_a_torn_last_line(tmp_path):
    from asyncrl.study import grid, write_report

    settings = grid([2], ["none"])
    for s in settings:
        write_torn(tmp_path / f"{s.name}-seed0" / "metrics.jsonl")
        (tmp_path / f"{s.name}-seed0" / "summary.json").write_text("{}")  # finished runs
    report = write_report(tmp_path, settings, seeds=1, target=0.6)
    assert "| sync" in (report / "summary.md").read_text()


def test_replay_reads_logged_losses_through_the_one_reader():
    # replay's own end-to-end test is tests/e2e/test_sync_and_replay.py (with a torn line
    # appended to metrics.jsonl); here: it reads metrics.jsonl through read_jsonl.
    src = (PACKAGE / "learner" / "replay.py").read_text()
    assert "read_jsonl(run_dir / \"metrics.jsonl\")" in src and "json.loads(line" not in src


def test_every_reader_of_run_files_uses_the_one_reader():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if p.name != "jsonl.py" and "splitlines()" in p.read_text()
                 and "json.loads" in p.read_text() and p.name != "dataset.py"]
    assert offenders == [], offenders


def test_rewards_have_one_home_and_one_meaning_per_name():
    from asyncrl.rewards import REWARD_FUNCTIONS

    homes = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.FunctionDef) and node.name.endswith("_reward")]
    assert set(homes) == {"asyncrl/rewards.py"}, homes
    correctness = REWARD_FUNCTIONS["correctness"]
    assert correctness("352", "352") == correctness("<answer>\n352\n</answer>", "352") == 1.0


def test_the_architecture_file_map_matches_the_tree():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    import re

    named = set(re.findall(r"^\| `(asyncrl/[\w/]+\.py)` \|", section, re.M))
    tree = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert sorted(tree - named) == [], "modules missing from docs/architecture.md's file map"
    assert sorted(named - tree) == [], "the file map names modules that do not exist"


def test_no_test_module_imports_another():
    offenders = []
    for p in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    ("tests.unit", "tests.e2e")):
                offenders.append(f"{p.relative_to(ROOT)}: from {node.module}")
    assert offenders == [], "shared test helpers belong in tests/helpers/: " + str(offenders)


def test_the_learner_step_applies_algo_and_writes_no_equation_of_its_own():
    src = (PACKAGE / "learner" / "step.py").read_text()
    tree = ast.parse(src)
    # arithmetic that belongs in algo/: scans, whitening, softmax, exp/log of ratios
    banned = {"cumsum", "flip", "sqrt", "log_softmax", "softmax", "exp", "log", "std", "var"}
    calls = {n.func.attr for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert calls & banned == set(), calls & banned
    assert "entropy_bonus_loss" in src and "(entropy * m)" not in src


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == [], "split these: " + "; ".join(long)


def test_no_callback_is_installed_by_assigning_an_attribute():
    """What a role reacts to is returned to its loop or passed in explicitly, so a reader
    sees every call: no `obj.on_x = ...`, `obj.before_x = ...`, `obj.after_x = ...`."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if (isinstance(t, ast.Attribute) and not (isinstance(t.value, ast.Name)
                                                               and t.value.id == "self")
                            and t.attr.startswith(("on_", "before_", "after_", "while_"))):
                        found.append(f"{name}:{node.lineno} .{t.attr}")
    assert found == [], found

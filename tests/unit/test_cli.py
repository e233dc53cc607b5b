"""Bad input at the command line ends at once with one clear message."""

import time

from tests.conftest import asyncrl


def test_help_is_instant():
    t0 = time.monotonic()
    r = asyncrl("--help")
    assert r.returncode == 0 and "run" in r.stdout
    assert time.monotonic() - t0 < 10


def test_mistyped_key_fails_before_anything_starts():
    r = asyncrl("run", "configs/default.yaml", "learner.lrr=1", "run_dir=/nonexistent/never")
    assert r.returncode == 2
    assert "learner.lrr" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_model_path_is_named():
    r = asyncrl("run", "configs/default.yaml", "model.path=/no/such/dir")
    assert r.returncode == 2
    assert "model.path='/no/such/dir' is not a directory" in r.stderr


def test_missing_config_file():
    r = asyncrl("run", "configs/missing.yaml")
    assert r.returncode == 2 and "configs/missing.yaml" in r.stderr


def test_overrides_after_options_are_taken_and_checked_before_any_run(tmp_path):
    r = asyncrl("study", "staleness", "configs/default.yaml", "--max-staleness", "0,2",
                "--out", str(tmp_path), "learner.lrr=1")
    assert r.returncode == 2 and "learner.lrr" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing was started
    r = asyncrl("run", "configs/default.yaml", "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr

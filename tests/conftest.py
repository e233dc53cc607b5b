import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Port offsets from net.base_port that a run with <= 4 generators / learner ranks uses.
_OFFSETS = [0, 1, 2, 3, 10, *range(20, 24), *range(60, 64)]


def free_base_port() -> int:
    """A base port whose whole offset table is free on loopback right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000, 100)
        socks = []
        try:
            for off in _OFFSETS:
                s = socket.socket()
                s.bind(("127.0.0.1", base + off))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


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

"""A peer that never comes up ends the waiting role with one clear message naming the setting."""

import subprocess
import sys

import pytest

from asyncrl.config import load_config, save_config
from asyncrl.transport import make_keys
from tests.conftest import ROOT, free_base_port

pytestmark = pytest.mark.e2e


def _alone(role, model_cache, tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    """Run one role with no peers and net.ready_timeout_s=5: (result, last stderr line)."""
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
        f"net.base_port={free_base_port()}", "net.ready_timeout_s=5"])
    save_config(cfg, tmp_path / "run.yaml")
    make_keys(tmp_path / "keys")  # roles started on their own read RUN_DIR/keys
    r = subprocess.run([sys.executable, "-m", "asyncrl", role, "--config",
                        str(tmp_path / "run.yaml")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0, r.stderr[-2000:]
    return r, r.stderr.strip().splitlines()[-1]  # the message a user reads


def test_learner_without_generators_fails_naming_the_setting(model_cache, tmp_path):
    _, last = _alone("learner", model_cache, tmp_path)  # after torchrun's own report
    assert last.startswith("asyncrl learner: learner[0]: weight sync: generators ['gen0'] did "
                           "not say hello within 5s"), last
    assert "net.ready_timeout_s" in last


def test_generator_pointed_at_nothing_fails_naming_the_setting(model_cache, tmp_path):
    r, last = _alone("generator", model_cache, tmp_path)
    assert last.startswith("asyncrl generator:"), r.stderr[-2000:]
    # Neither the buffer nor the learner is there: whichever wait ends first is named.
    assert "net.ready_timeout_s" in last, last
    assert "net.learner_host" in last or "net.buffer_host" in last, last


def test_torchrun_learner_straight_from_a_config_map_resolves_the_builtin_model(model_cache,
                                                                               tmp_path):
    """Kubernetes starts `torchrun -m asyncrl.learner` on the ConfigMap's config, which still
    names builtin:tiny-addition: the learner builds (or reuses) it itself, then waits for its
    peers, instead of failing on a directory that has no config.json."""
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
        f"net.base_port={free_base_port()}", "net.ready_timeout_s=5"])
    assert cfg.model.path == "builtin:tiny-addition"
    save_config(cfg, tmp_path / "run.yaml")
    make_keys(tmp_path / "keys")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "1", "-m", "asyncrl.learner", "--config",
                        str(tmp_path / "run.yaml")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert "no config.json" not in out, out[-2000:]
    assert "reusing built model" in out, out[-2000:]
    assert "weight sync: generators ['gen0'] did not say hello within 5s" in out, out[-2000:]

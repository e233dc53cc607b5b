"""Prometheus' own linter on what asyncrl exposes and on the deploy/ configs.

promtool comes from Debian's `prometheus` package (scripts/test.sh installs it when run as
root). Without it these tests are skipped, except under CI, where a missing promtool fails.
"""

import os
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import generate_latest

from tests.conftest import ROOT
from tests.helpers.metrics import ROLE_CLASSES, dashboard_exprs, doc_queries, filled


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = ("promtool not found: install Debian's `prometheus` package "
               "(apt-get install prometheus; scripts/test.sh does it when run as root)")
        if _in_ci():
            pytest.fail(msg + " -- CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
    return path


def _check(promtool: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "check", *args], input=stdin, capture_output=True,
                          timeout=60)


@pytest.mark.parametrize("role", sorted(ROLE_CLASSES))
def test_exposition_passes_promtool_check_metrics(promtool, role):
    text = generate_latest(filled(ROLE_CLASSES[role]))
    assert b"_bucket{" in text or role in ("buffer", "launcher")  # histograms really observed
    r = _check(promtool, "metrics", stdin=text)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()


def test_promtool_check_metrics_does_flag_bad_names(promtool):
    """The check above means something: a counter without _total and a non-base unit fail."""
    bad = (b"# HELP asyncrl_x_count Things\n# TYPE asyncrl_x_count counter\nasyncrl_x_count 1\n"
           b"# HELP asyncrl_y_milliseconds T\n# TYPE asyncrl_y_milliseconds gauge\n"
           b"asyncrl_y_milliseconds 2\n")
    r = _check(promtool, "metrics", stdin=bad)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode != 0 and "_total" in out and "seconds" in out, out


def test_prometheus_yml_is_a_valid_config(promtool, tmp_path):
    path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    r = _check(promtool, "config", str(path))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    # The commented file_sd example for Slurm is valid too once uncommented.
    text = path.read_text()
    block = text[text.rindex("\n", 0, text.index("# - job_name: asyncrl-slurm")) + 1:]
    example = "\n".join(re.sub(r"^  # ?", "  ", line) for line in block.splitlines())
    cfg = yaml.safe_load(text)
    cfg["scrape_configs"] += yaml.safe_load(example)
    targets = tmp_path / "prometheus-targets.json"
    targets.write_text('[{"targets": ["n1:47110"], "labels": {"role": "buffer"}}]')
    cfg["scrape_configs"][-1]["file_sd_configs"][0]["files"] = [str(targets)]
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    r = _check(promtool, "config", str(tmp_path / "p.yml"))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_every_query_is_valid_promql(promtool, tmp_path):
    """Each dashboard and docs query, as a recording rule: `promtool check rules` parses it."""
    exprs = [e.replace("$__rate_interval", "1m") for e in dashboard_exprs() + doc_queries()]
    rules = {"groups": [{"name": "asyncrl", "rules": [
        {"record": f"asyncrl:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = _check(promtool, "rules", str(path))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert f"{len(exprs)} rules found" in r.stdout.decode()

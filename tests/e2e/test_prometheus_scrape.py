"""A real Prometheus server, configured from deploy/prometheus/prometheus.yml, scrapes a real run.

The run is the whole loop (vLLM on CPU, ZeroMQ, torchrun); Prometheus is Debian's `prometheus`
binary on loopback, with the deploy config's targets moved to this run's ports. The test passes
when PromQL over the scraped data shows generated tokens (and the buffer, generator 0 and
learner rank 0 targets up), which checks the scrape config's ports and the exposition together.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import psutil
import pytest
import yaml

from asyncrl.config import NetConfig
from tests.conftest import ROOT, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

TOKENS_QUERY = "sum(rate(asyncrl_generator_generated_tokens_total[15s]))"


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = ("prometheus not found: install Debian's `prometheus` package "
               "(scripts/test.sh does it when run as root)")
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(msg + " -- CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
    return path


def _prometheus_config(base_port: int, path) -> dict[str, str]:
    """deploy/prometheus/prometheus.yml with 1 s scrapes and targets moved to base_port.
    Returns {"buffer": addr, "generator 0": addr, ...} of the rewritten targets."""
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    default_base = NetConfig().base_port
    addrs = {}
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            moved = [f"127.0.0.1:{base_port + int(t.rsplit(':', 1)[1]) - default_base}"
                     for t in sc["targets"]]
            sc["targets"] = moved
            labels = sc.get("labels", {})
            key = " ".join([job["job_name"].removeprefix("asyncrl-"), *labels.values()])
            addrs[key] = moved[0]
    path.write_text(yaml.safe_dump(cfg))
    return addrs


def _query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _generated_tokens(port: int) -> float:
    """The generator's own counter, read from its /metrics (0 until it is up and sampling)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("asyncrl_generator_generated_tokens_total "):
            return float(line.split()[1])
    return 0.0


def _stop(proc: subprocess.Popen, sig: int, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_prometheus_scrapes_generated_tokens_from_a_real_run(model_cache, tmp_path):
    prometheus = _prometheus_binary()
    base = free_base_port(99)
    prom_port = base + 99  # in the run's block, outside the ephemeral range; no role binds it
    addrs = _prometheus_config(base, tmp_path / "prometheus.yml")
    overrides = {"warm_start.cache_dir": model_cache, "run_dir": tmp_path / "run",
                 "net.base_port": base, "learner.total_steps": 30, "learner.nproc": 1,
                 "learner.groups_per_step": 4, "generator.group_size": 4,
                 "generator.prompts_per_call": 4, "learner.eval_interval": 100,
                 "net.ready_timeout_s": 120, "weight_sync.timeout_s": 120}
    run = subprocess.Popen(
        [sys.executable, "-m", "asyncrl", "run", "configs/default.yaml",
         *(f"{k}={v}" for k, v in overrides.items())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    prom_log = (tmp_path / "prometheus.log").open("w")
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True)
    family = []
    try:
        deadline = time.monotonic() + 420  # model load, vLLM start-up on a busy 2-core machine
        while _generated_tokens(NetConfig(base_port=base).generator_metrics_port(0)) <= 0:
            assert run.poll() is None, f"run ended early:\n{run.stdout.read()}"
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "the run produced no tokens in time"
            time.sleep(1)
        family = psutil.Process(run.pid).children(recursive=True)

        t0 = time.monotonic()
        tokens_per_s, up = 0.0, {}
        while time.monotonic() - t0 < 90:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                result = _query(prom_port, TOKENS_QUERY)
                up = {r["metric"]["instance"]: r["value"][1] for r in _query(prom_port, "up")}
            except OSError:  # Prometheus still starting
                result = []
            tokens_per_s = float(result[0]["value"][1]) if result else 0.0
            wanted = [addrs["buffer"], addrs["generator 0"], addrs["learner 0"]]
            if tokens_per_s > 0 and all(up.get(a) == "1" for a in wanted):
                break
            assert run.poll() is None, (
                "run ended before Prometheus saw tokens:\n" + run.stdout.read())
            time.sleep(1)
        assert tokens_per_s > 0, (TOKENS_QUERY, tokens_per_s, up,
                                  (tmp_path / "prometheus.log").read_text()[-3000:])
        assert all(up.get(a) == "1" for a in wanted), up
        print(f"prometheus saw {tokens_per_s:.1f} tokens/s after {time.monotonic() - t0:.1f} s")
    finally:
        _stop(prom, signal.SIGTERM, 15)
        prom_log.close()
        _stop(run, signal.SIGINT, 60)  # the launcher stops every role on Ctrl-C
        for p in family:  # anything the launcher could not stop
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

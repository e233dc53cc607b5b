from prometheus_client import CollectorRegistry, Histogram, generate_latest

from asyncrl.metrics import observe_many


def test_observe_many_equals_that_many_observations():
    regs = [CollectorRegistry(), CollectorRegistry()]
    one, many = (Histogram("h", "h", buckets=(0, 1, 2, 4), registry=r) for r in regs)
    for lag, n in ((0, 3), (2, 500), (7, 2), (1, 0)):
        for _ in range(n):
            one.observe(lag)
        observe_many(many, lag, n)
    one_text, many_text = (
        [x for x in generate_latest(r).decode().splitlines() if "_created" not in x]
        for r in regs)
    assert one_text == many_text
    assert 'h_bucket{le="2.0"} 503.0' in many_text and 'h_sum 1014.0' in many_text


def test_launches_one_after_another_in_one_process_each_get_the_metrics_port(tmp_path,
                                                                            monkeypatch):
    """`asyncrl study` and the benchmarks call launch() once per run in one process: the
    launcher's metrics server must free its port when a run ends (it once stayed bound, and
    the second run of every sweep died with 'Address already in use')."""
    import sys
    import urllib.request

    from asyncrl import launcher
    from asyncrl.config import load_config
    from tests.conftest import free_base_port

    cfg = load_config("configs/default.yaml", [f"net.base_port={free_base_port()}",
                                                f"run_dir={tmp_path}"])
    url = f"http://{cfg.net.bind_host}:{cfg.net.launcher_metrics_port}/metrics"
    scraped = []
    # The one role: a learner that scrapes the launcher's metrics, then exits 0 (run over).
    script = (f"import urllib.request; urllib.request.urlopen({url!r}, timeout=10).read(); "
              "print('scraped')")
    monkeypatch.setattr(launcher, "role_commands",
                        lambda cfg, path: {"learner": [sys.executable, "-c", script]})
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        assert launcher.launch(cfg, run_dir, tmp_path / "config.yaml", out=lambda _: None) == 0
        scraped.append((run_dir / "logs" / "learner.log").read_text().strip())
    assert scraped == ["scraped", "scraped"]
    try:  # and nothing serves there once the runs are over
        urllib.request.urlopen(url, timeout=2)
        raise AssertionError(f"{url} still answers after the last run")
    except OSError:
        pass

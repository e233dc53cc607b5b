"""`asyncrl reward`: the reward role (reward.service). Serves task.reward_model's scores to
every generator on net.reward_port (a ROUTER admitting generator keys only), its metrics on
net.reward_metrics_port. One thread: read every request waiting, then score one batch of
them (reward.max_batch texts, across generators) and answer; requests that arrive meanwhile
wait in the queue, past reward.max_queue texts they are answered busy.

Run (normally started, and restarted when it dies, by `asyncrl run`):
    python -m asyncrl reward --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import logging

from asyncrl.config import RunConfig
from asyncrl.reward.service import RewardService

log = logging.getLogger("asyncrl.reward")
READS_PER_ROUND = 1024


def run(cfg: RunConfig, gpu: bool = False) -> None:
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics, transport
    from asyncrl.reward.engine import make_scorer

    registry = CollectorRegistry()
    m = metrics.RewardMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.reward_metrics_port)
    scorer = make_scorer(cfg, gpu)
    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir, "reward")
    server = transport.Server(ctx, cfg.net.bind_host, cfg.net.reward_port, keys,
                              lambda port, reason: m.auth_failures.labels(str(port),
                                                                          reason).inc(),
                              (transport.GENERATORS,))
    service = RewardService(scorer, m, cfg.reward.max_batch, cfg.reward.max_queue)
    log.info("reward service: %s (%s) on port %d, metrics on %d", cfg.task.reward_model,
             cfg.reward.backend, cfg.net.reward_port, cfg.net.reward_metrics_port)
    serve(service, server, m)


def serve(service: RewardService, server, m, rounds: int | None = None) -> None:
    """Read what is waiting, score one batch, answer; `rounds` loops (None: forever)."""
    from asyncrl import transport

    done = 0
    while rounds is None or done < rounds:
        wait, reads = (0.0 if service.queue else 0.5), 0
        # At most READS_PER_ROUND frames before the next batch: a flood never starves it.
        while reads < READS_PER_ROUND and transport.poll_servers([server], timeout_s=wait):
            wait, reads = 0.0, reads + 1
            got = server.recv()
            if got is None:
                m.rejected.labels("bad_framing").inc()
                continue
            reply = service.take(got.ident, got.payload, got.role)
            if reply is not None:
                server.send(got.ident, reply)
        jobs = service.next_batch()
        if jobs:
            truncated = service.scorer.truncated
            for ident, reply in service.score(jobs):
                server.send(ident, reply)  # a vanished generator resends to the next one
            m.truncated.inc(service.scorer.truncated - truncated)
        done += 1

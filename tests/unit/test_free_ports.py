"""The test and benchmark port picker: every port a role binds, outside the ephemeral range."""

import socket

from asyncrl.config import BOUNDS, PORT_SPAN, NetConfig
from benchmarks.common import ephemeral_ports, free_block, run_port_offsets
from tests.conftest import free_base_port


def test_the_offsets_cover_every_port_a_role_binds():
    net = NetConfig(base_port=0)
    bound = {net.buffer_ingest_port, net.buffer_learner_port, net.sync_control_port,
             net.sync_store_port, net.heartbeat_port, net.launcher_metrics_port,
             net.buffer_metrics_port,
             *(net.generator_metrics_port(i) for i in range(4)),
             *(net.learner_metrics_port(r) for r in range(4)),
             *(net.endpoint_port(i) for i in range(4))}
    assert bound <= set(run_port_offsets(4, 4))
    assert max(run_port_offsets(40, 4)) < PORT_SPAN
    assert net.heartbeat_port == 4 and 4 in run_port_offsets()


def test_the_block_is_outside_the_ephemeral_range_and_free():
    lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert ephemeral_ports() == range(lo, hi + 1)
    for _ in range(50):
        base = free_base_port(99)
        assert base + 99 < lo or base > hi, (base, lo, hi)
    with socket.socket() as s:  # what it checked is bindable
        s.bind(("127.0.0.1", base + 4))


def test_every_base_it_can_pick_is_one_the_config_accepts():
    """CI once drew base 65400, above net.base_port's bound (the endpoints' ports had
    widened a run's span past the picker's block of 100), and a run refused its config."""
    bound = BOUNDS["net.base_port"]
    offsets = run_port_offsets()
    seen = {free_block(offsets) for _ in range(300)}
    assert all(bound.low <= b <= bound.high for b in seen), sorted(seen)[-3:]
    assert all(b + PORT_SPAN <= 65536 for b in seen)

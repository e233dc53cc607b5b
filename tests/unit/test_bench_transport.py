"""benchmarks/transport.py end to end at a tiny scale: real sockets, the buffer's handler and
durable log in child processes. Timings are not asserted; what is: every mode ran against a
buffer that accepted every frame, the figures and ratios are written, and the stand-in learner
takes through the handler, so the durable log is compacted instead of growing."""

import json
import math
from pathlib import Path

from benchmarks import transport


def test_transport_benchmark_writes_every_ratio_and_the_floor(tmp_path):
    out = tmp_path / "t.json"
    transport.main(["--reps", "1", "--scale", "0.03", "--work-dir", str(tmp_path / "w"),
                    "--json", str(out)])
    d = json.loads(out.read_text())
    for case in transport.CASES:
        slug = f"{case.groups}x{case.group_size}x{case.tokens}tok"
        for mode in ("acked", "pipelined", "acked_curve", "pipelined_curve"):
            r = d["ratios"][f"{slug}_{mode}_vs_raw"]
            assert math.isfinite(r) and r > 0
        assert d["ratios"][f"{slug}_raw_ms_over_floor_ms"] > 0
        f = d["figures"]
        # the floor is part of the handler's own work (CRC, msgpack, durable append)
        assert 0 < f[f"{slug}_durable_append_ms"] < f[f"{slug}_floor_ms"]
        assert f[f"{slug}_crc_ms"] < f[f"{slug}_decode_ms"]
    # the benchmark's logs are removed with its work directory's temporary folder
    assert not list(Path(tmp_path / "w").glob("durable-*"))


def test_stand_in_learner_compacts_the_durable_log(tmp_path):
    from prometheus_client import CollectorRegistry

    from asyncrl.buffer.durable import DurableLog
    from asyncrl.buffer.main import BufferHandler
    from asyncrl.buffer.store import ReplayBuffer
    from asyncrl.metrics import BufferMetrics

    case = transport.CASES[2]
    log = DurableLog(tmp_path / "log.bin")
    handler = BufferHandler(ReplayBuffer(64, 2), BufferMetrics(CollectorRegistry()),
                            transport.VOCAB, log)
    for frame in transport.make_frames(case, 4, "inc"):
        handler.on_trajectories(frame)
    grown = log.path.stat().st_size
    res = handler.take(len(handler.store), handler.store.learner_version)
    assert len(res.groups) == 4 * case.groups and len(handler.store) == 0
    assert log.path.stat().st_size < grown / 4  # only the dedup table is left
    # and a restarted buffer holds nothing, but still knows the stream
    again = BufferHandler(ReplayBuffer(64, 2), BufferMetrics(CollectorRegistry()),
                          transport.VOCAB, DurableLog(tmp_path / "log.bin"))
    assert again.recover() == 0 and again.accepted_seq == {("gen0", "inc"): 4}

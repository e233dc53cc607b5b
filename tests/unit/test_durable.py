"""The buffer's durable log: recovery rebuilds exactly what was acknowledged and not served."""

import struct

import pytest
from prometheus_client import CollectorRegistry

from asyncrl import wire
from asyncrl.buffer.durable import ADD, DurableLog
from asyncrl.buffer.main import BufferHandler
from asyncrl.buffer.store import ReplayBuffer
from asyncrl.metrics import BufferMetrics
from tests.helpers.wire import traj_frame


def _handler(path, capacity=100):
    return BufferHandler(ReplayBuffer(capacity, 5), BufferMetrics(CollectorRegistry()), 50,
                         DurableLog(path))


def _take(h, n, version=0):
    return wire.decode(h.on_batch_request(wire.encode("batch_request", version, rank=0,
                                                      num_groups=n)))


def test_recovery_holds_what_was_acked_and_not_served(tmp_path):
    h = _handler(tmp_path / "log.bin")
    for i in range(1, 6):
        assert wire.decode(h.on_trajectories(traj_frame(i, pid=i))).status == "ok"
    assert [g.prompt_id for g in _take(h, 2).groups] == [1, 2]
    again = _handler(tmp_path / "log.bin")  # a new process reading the same log
    assert again.recover() == 3
    assert [g.prompt_id for g in _take(again, 3).groups] == [3, 4, 5]
    # the dedup table survived: a resend of an acked message is not stored twice
    assert wire.decode(again.on_trajectories(traj_frame(5, pid=5))).reason == "duplicate"


def test_compaction_keeps_the_dedup_table(tmp_path):
    h = _handler(tmp_path / "log.bin")
    h.on_trajectories(traj_frame(1, pid=1))
    _take(h, 1)  # store empty: the log is compacted to a snapshot
    assert (tmp_path / "log.bin").stat().st_size < 100
    again = _handler(tmp_path / "log.bin")
    assert again.recover() == 0
    assert wire.decode(again.on_trajectories(traj_frame(1, pid=1))).reason == "duplicate"


def test_stale_drops_replay_the_same_way(tmp_path):
    h = _handler(tmp_path / "log.bin")
    h.on_trajectories(traj_frame(1, pid=1, version=0))
    h.on_trajectories(traj_frame(2, pid=2, version=9))
    assert _take(h, 5, version=9).status == "not_ready"  # drops version 0 (bound 5)
    again = _handler(tmp_path / "log.bin")
    assert again.recover() == 1


def test_torn_tail_is_detected_and_cut(tmp_path):
    path = tmp_path / "log.bin"
    h = _handler(path)
    for i in range(1, 4):
        h.on_trajectories(traj_frame(i, pid=i))
    good = path.stat().st_size
    with path.open("ab") as f:  # the process died in the middle of a record
        f.write(b"\x40\x00\x00\x00\x12\x34\x56\x78\x01partial")
    again = _handler(path)
    assert again.recover() == 3
    assert again.durable.torn_records == 1 and path.stat().st_size == good
    records = list(DurableLog(path).replay())
    assert [k for k, _ in records] == [ADD] * 3


@pytest.mark.parametrize("where", ["magic", "frame_crc", "body", "last_byte", "record_crc"])
def test_a_complete_but_corrupted_last_record_is_cut(tmp_path, where):
    # ADD records reuse the frame's own CRC-32: a flipped byte anywhere in the record, its
    # frame header included, must still fail the check.
    path = tmp_path / "log.bin"
    h = _handler(path)
    for i in range(1, 4):
        h.on_trajectories(traj_frame(i, pid=i))
    size = path.stat().st_size
    last = size - 9 - len(traj_frame(3, pid=3))  # start of the last record (9-byte record head)
    offset = {"magic": last + 9 + 1, "frame_crc": last + 9 + 5, "body": last + 9 + 30,
              "last_byte": size - 1, "record_crc": last + 5}[where]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    again = _handler(path)
    assert again.recover() == 2 and again.durable.torn_records == 1
    assert path.stat().st_size == last


def _old_schema(frame: bytes) -> bytes:
    import msgpack

    msg = msgpack.unpackb(frame[8:], raw=False)
    return wire.seal(msgpack.packb({**msg, "schema": wire.SCHEMA_VERSION - 1}, use_bin_type=True))


def test_a_log_written_by_another_message_schema_is_named_not_cut(tmp_path):
    import zlib

    from asyncrl.learner.runlog import BatchLog

    old = _old_schema(traj_frame(1, pid=1))  # as the log of an older asyncrl wrote it
    (tmp_path / "log.bin").write_bytes(struct.pack("<IIB", len(old), zlib.crc32(old), ADD) + old)
    with pytest.raises(RuntimeError, match="log.bin: a record does not decode .*another asyncrl"):
        _handler(tmp_path / "log.bin").recover()
    # The learner's batch log: an old frame is not mistaken for a torn one and cut off.
    batch = wire.decode(traj_frame(1, pid=1)).groups
    BatchLog(tmp_path, rank=0).append(1, batch, 0)
    path = tmp_path / "batches" / "rank0.bin"
    frame = path.read_bytes()[8:]
    old = _old_schema(frame)
    path.write_bytes(len(old).to_bytes(8, "little") + old)
    size = path.stat().st_size
    with pytest.raises(RuntimeError, match="asyncrl version that wrote it"):
        BatchLog(tmp_path, rank=0)
    assert path.stat().st_size == size


def test_the_audit_of_a_run_whose_log_another_version_wrote_says_so_in_one_line(tmp_path,
                                                                                 capsys):
    import zlib

    from asyncrl.cli import main

    old = _old_schema(traj_frame(1, pid=1))
    (tmp_path / "buffer").mkdir()
    log = tmp_path / "buffer" / "log.bin"
    log.write_bytes(struct.pack("<IIB", len(old), zlib.crc32(old), ADD) + old)
    assert main(["audit", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(log) in err and "another asyncrl version" in err

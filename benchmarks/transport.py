"""Buffer ingest vs raw ZeroMQ PUSH/PULL of the same bytes (docs/performance.md section 1).

The sender (this process) plays the generator: it sends `trajectories` frames built by
`asyncrl.wire.encode` with an `asyncrl.transport.Client` DEALER and decodes each ack. The
receiver is a child process running the buffer's request loop: `asyncrl.transport.Server`
(ROUTER) + `asyncrl.buffer.main.BufferHandler` over a `ReplayBuffer`, i.e. validation of every
frame (checksum, msgpack, every field and array, token ids against a 259-token vocabulary),
duplicate check, admission, the durable log (`buffer.durable`, on by default: each accepted
frame appended and flushed to a file before the ack, no fsync) and the ack. It is the loop
`asyncrl.buffer.main.run` runs (`asyncrl.buffer.main.serve`) on the ingest socket alone,
without the learner's socket, heartbeats and the Prometheus HTTP server, and with the handler
standing in for the learner: whenever the store holds `--admit-groups` groups they are taken
out through the handler as a learner's request takes them (`BufferHandler.take`:
the durable log records the TAKE and, the store being empty, is compacted; the batch's
encoding, which is serving and not ingest, is left out), so occupancy and the log's size stay
realistic and the buffer never answers busy.

Raw baseline: a PUSH socket in this process, a PULL socket in a child process, the identical
frames, no decoding. Both rates are measured from the first send to the receiver's last
acknowledgement (raw: an END frame answered once everything before it has arrived).

Modes: `acked` is what the generator does (one request, wait for its ack, next request);
`pipelined` keeps `--window` requests in flight on one DEALER (what a generator that sends
while it generates the next batch could do). Each mode is run `--reps` times, interleaved with
the raw run; the table shows medians and the ratio to the raw median of the same case.

CurveZMQ (net.curve, on by default): the acked and pipelined modes run against two buffers side
by side, one with the run's CURVE keys on every socket and one without, so the table shows what
authentication and encryption cost on ingest; `--json` writes the ratios
(`<case>_<mode>_vs_raw`, `<case>_<mode>_curve_vs_plain`).

A second table splits the receiver's per-message cost (CRC, msgpack, array construction,
validation and building the groups, the durable append, the whole handler without sockets) and
gives the floor: CRC + msgpack + durable append, what a receiver that checked nothing would
still do. raw / floor (`--json`: `<case>_raw_ms_over_floor_ms`) is the most such a receiver
could reach in "x raw".

Run from the repository root (about 70 s on 2 cores):
    .venv/bin/python -m benchmarks.transport [--json PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

VOCAB = 259  # the tiny tokenizer's size


@dataclass
class Case:
    name: str
    groups: int  # groups per message (generator.prompts_per_call)
    group_size: int
    tokens: int  # completion tokens
    prompt_tokens: int
    messages: int


CASES = [
    Case("8x8 compl x 2048 tok", 8, 8, 2048, 256, 100),
    Case("8x8 compl x 256 tok", 8, 8, 256, 64, 300),
    Case("8x8 compl x 6 tok (default run)", 8, 8, 6, 7, 300),
]


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each mode (median shown)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the number of messages per repetition (default 300)")
    p.add_argument("--window", type=int, default=16, help="requests in flight when pipelined")
    p.add_argument("--admit-groups", type=int, default=512,
                   help="groups held before the stand-in learner takes them all")
    p.add_argument("--no-durable", action="store_true",
                   help="no durable log (buffer.durable=false)")
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench",
                   help="the durable log goes to a temporary directory in here")
    common.add_json_argument(p)
    return p


# ------------------------------------------------------------------ frames


def make_frames(case: Case, n: int, incarnation: str) -> list[bytes]:
    """n frames with seq 1..n; a few distinct payloads cycled (content does not change cost)."""
    from asyncrl import wire
    from asyncrl.testing import make_groups

    pool = [make_groups(case.groups, case.group_size, rng=seed, vocab_size=VOCAB,
                        prompt_len=case.prompt_tokens, completion_len=case.tokens,
                        finish_reason="length", created_at=time.time())
            for seed in range(8)]
    return [wire.encode("trajectories", 0, sender="gen0", incarnation=incarnation, seq=i + 1,
                        groups=pool[i % len(pool)]) for i in range(n)]


# ------------------------------------------------------------------ receivers (child processes)


def buffer_loop(port: int, admit_groups: int, log_path: str | None, keys_dir: str | None,
                ready) -> None:
    """The buffer's own request loop (asyncrl.buffer.main.serve) on an ingest socket alone,
    its handler standing in for the learner too; with keys_dir, CurveZMQ on its socket as in
    a run."""
    from prometheus_client import CollectorRegistry

    from asyncrl import transport
    from asyncrl.buffer.durable import DurableLog
    from asyncrl.buffer.main import BufferHandler, serve
    from asyncrl.buffer.store import ReplayBuffer
    from asyncrl.guard import NewStreams
    from asyncrl.metrics import BufferMetrics

    class StandInLearner(BufferHandler):
        """The handler, and a learner that takes every group once admit_groups are held."""

        def on_trajectories(self, frame: bytes, role: str | None = None) -> bytes:
            reply = super().on_trajectories(frame, role)
            if len(self.store) >= admit_groups:  # the learner takes a batch, as a learner
                # does: the durable log records the TAKE and, the store being empty, is
                # compacted, as in a run (a log that only grew would soon be held to the
                # disk's write rate by the page cache's writeback). Encoding the batch is
                # serving, not ingest, and is left out.
                self.take(len(self.store), self.store.learner_version)
            return reply

    store = ReplayBuffer(capacity_groups=10 * admit_groups, max_staleness=2)
    durable = DurableLog(Path(log_path), fsync=False) if log_path else None
    handler = StandInLearner(store, BufferMetrics(CollectorRegistry()), VOCAB, durable)
    # Every case opens streams (incarnations) of its own, more than a run's bound on them.
    handler.streams = NewStreams(limit=10**6)
    keys = transport.load_keys(keys_dir, "buffer") if keys_dir else None
    ingest = transport.Server(transport.context(), "127.0.0.1", port, keys)
    ready.set()
    serve(handler, ingest)


def raw_sink(port: int, done_port: int, ready) -> None:
    """PULL every frame; on b"END" tell the sender everything before it has arrived."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    done = ctx.socket(zmq.PUSH)
    done.connect(f"tcp://127.0.0.1:{done_port}")
    ready.set()
    while True:
        if pull.recv() == b"END":
            done.send(b"done")


# ------------------------------------------------------------------ senders (this process)


def run_raw(push, done, frames: list[bytes]) -> float:
    t0 = time.perf_counter()
    for f in frames:
        push.send(f)
    push.send(b"END")
    done.recv()
    return time.perf_counter() - t0


def _check_ack(reply: bytes | None) -> None:
    from asyncrl import wire

    if reply is None:
        raise TimeoutError("no ack from the buffer within 30 s")
    ack = wire.decode(reply, expect=("ack",))
    if ack.status != "ok" or ack.reason:
        raise RuntimeError(f"buffer answered {ack.status} ({ack.reason}): the benchmark "
                           "would not measure ingest")


def run_acked(client, frames: list[bytes]) -> float:
    t0 = time.perf_counter()
    for f in frames:
        _check_ack(client.request(f, timeout_s=30.0))
    return time.perf_counter() - t0


def run_pipelined(client, frames: list[bytes], window: int) -> float:
    t0 = time.perf_counter()
    sent = acked = 0
    while acked < len(frames):
        while sent < len(frames) and sent - acked < window:
            client.send(frames[sent])
            sent += 1
        _check_ack(client.poll(30.0))
        acked += 1
    return time.perf_counter() - t0


def decode_breakdown(case: Case, frames: list[bytes], log_dir: str) -> list[float]:
    """ms per message, in this process (best of 3): CRC-32; msgpack with arrays left as raw
    extension bytes; msgpack building the numpy arrays (wire's ext hook); the full
    wire.decode: every check on the columns, the vocabulary check, and slicing the columns into
    TrajectoryGroup/Completion objects; the durable log's append of the frame (written and
    flushed, no fsync); the floor: CRC + msgpack with arrays + the durable append, which a
    receiver that checks nothing still does; the whole BufferHandler.on_trajectories (decode,
    dedup, admission, durable append, ack encoded), without the sockets."""
    import zlib

    import msgpack
    from prometheus_client import CollectorRegistry

    from asyncrl import wire
    from asyncrl.buffer.durable import ADD, DurableLog
    from asyncrl.buffer.main import BufferHandler
    from asyncrl.buffer.store import ReplayBuffer
    from asyncrl.metrics import BufferMetrics

    def arrays(f: bytes):
        return msgpack.unpackb(memoryview(f)[8:], ext_hook=wire._unpack_array, raw=False)

    log = DurableLog(Path(log_dir) / f"breakdown-{case.tokens}.bin")

    def floor(f: bytes) -> None:
        zlib.crc32(memoryview(f)[8:])
        arrays(f)
        log.append(ADD, f)

    def handler() -> BufferHandler:  # fresh per round: every frame is new to it
        store = ReplayBuffer(10**9, 2)
        return BufferHandler(store, BufferMetrics(CollectorRegistry()), VOCAB, log)

    steps = [lambda: lambda f: zlib.crc32(memoryview(f)[8:]),
             lambda: lambda f: msgpack.unpackb(memoryview(f)[8:], raw=False),
             lambda: arrays,
             lambda: lambda f: wire.decode(f, expect=("trajectories",), vocab_size=VOCAB),
             lambda: lambda f: log.append(ADD, f),
             lambda: floor,
             lambda: handler().on_trajectories]
    out = []
    for make in steps:
        best = float("inf")
        for _ in range(3):
            step = make()
            t0 = time.perf_counter()
            for f in frames:
                step(f)
            best = min(best, time.perf_counter() - t0)
        out.append(best / len(frames) * 1e3)
    log.close()
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import zmq

    from asyncrl import transport
    from benchmarks.common import free_port, machine, median, table

    print(f"# buffer ingest vs raw ZeroMQ, CurveZMQ on and off  ({machine()})")
    spawn = mp.get_context("spawn")
    buf_port, curve_port, raw_port, done_port = free_port(), free_port(), free_port(), free_port()
    ctx = zmq.Context()
    done = ctx.socket(zmq.PULL)
    done.bind(f"tcp://127.0.0.1:{done_port}")
    ready_b, ready_r = spawn.Event(), spawn.Event()
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    log_dir = tempfile.mkdtemp(prefix="durable-", dir=work)
    log_path = None if args.no_durable else str(Path(log_dir) / "log.bin")
    curve_log = None if args.no_durable else str(Path(log_dir) / "log-curve.bin")
    keys_dir = transport.make_keys(Path(log_dir) / "keys")
    ready_c = spawn.Event()
    children = [spawn.Process(target=buffer_loop, daemon=True,
                              args=(buf_port, args.admit_groups, log_path, None, ready_b)),
                spawn.Process(target=buffer_loop, daemon=True,
                              args=(curve_port, args.admit_groups, curve_log, str(keys_dir),
                                    ready_c)),
                spawn.Process(target=raw_sink, args=(raw_port, done_port, ready_r), daemon=True)]
    for c in children:
        c.start()
    try:
        if not (ready_b.wait(60) and ready_c.wait(60) and ready_r.wait(60)):
            raise TimeoutError("receiver processes did not start within 60 s")
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"tcp://127.0.0.1:{raw_port}")
        clients = {"": transport.Client(transport.context(), "127.0.0.1", buf_port, "gen0"),
                   "_curve": transport.Client(transport.context(), "127.0.0.1", curve_port,
                                              "gen0", transport.load_keys(keys_dir, "gen0"))}
        rows, costs, figures, ratios = [], [], {}, {}
        for ci, case in enumerate(CASES):
            n = max(10, int(case.messages * args.scale))
            times: dict[str, list[float]] = {m: [] for m in (
                "raw", "acked", "pipelined", "acked_curve", "pipelined_curve")}
            run_raw(push, done, make_frames(case, 10, f"warm{ci}"))  # connect, warm up
            for tag, client in clients.items():
                run_acked(client, make_frames(case, 10, f"warmb{ci}{tag}"))
            for rep in range(args.reps):
                frames = make_frames(case, n, f"c{ci}r{rep}a")
                times["raw"].append(run_raw(push, done, frames))
                for tag, client in clients.items():  # the same frames, one buffer each
                    times["acked" + tag].append(run_acked(client, frames))
                for tag, client in clients.items():
                    frames = make_frames(case, n, f"c{ci}r{rep}p{tag}")
                    times["pipelined" + tag].append(run_pipelined(client, frames, args.window))
            parts = decode_breakdown(case, frames[:50], log_dir)
            raw_ms = median(times["raw"]) / n * 1e3
            costs.append([case.name, *(f"{x:.2f}" for x in parts), f"{raw_ms:.3f}",
                          f"{raw_ms / parts[5]:.2f}"])
            nbytes = sum(map(len, frames)) / n
            traj = case.groups * case.group_size
            raw_s = median(times["raw"])
            slug = f"{case.groups}x{case.group_size}x{case.tokens}tok"
            for mode, label in (("raw", "raw PUSH/PULL"), ("acked", "asyncrl acked"),
                                ("acked_curve", "asyncrl acked, CURVE"),
                                ("pipelined", f"asyncrl pipelined w={args.window}"),
                                ("pipelined_curve", f"asyncrl pipelined w={args.window}, CURVE")):
                s = median(times[mode])
                plain = median(times[mode.removesuffix("_curve")])
                rows.append([case.name if mode == "raw" else "",
                             f"{nbytes / 1e3:.1f}" if mode == "raw" else "", label,
                             f"{n / s:,.0f}", f"{n * traj / s:,.0f}", f"{n * nbytes / s / 1e6:.1f}",
                             f"{raw_s / s:.3f}",
                             f"{plain / s:.3f}" if mode.endswith("_curve") else ""])
                figures[f"{slug}_{mode}_msg_per_s"] = n / s
                if mode != "raw":
                    ratios[f"{slug}_{mode}_vs_raw"] = raw_s / s
                if mode.endswith("_curve"):
                    ratios[f"{slug}_{mode.removesuffix('_curve')}_curve_vs_plain"] = plain / s
            figures[f"{slug}_kb_per_msg"] = nbytes / 1e3
            for key, x in zip(("crc_ms", "decode_ms", "durable_append_ms", "floor_ms",
                               "handler_ms"), (parts[0], parts[3], parts[4], parts[5], parts[6]),
                              strict=True):
                figures[f"{slug}_{key}"] = x
            figures[f"{slug}_raw_ms"] = raw_ms
            # The most any receiver doing the floor's work can reach, in "x raw".
            ratios[f"{slug}_raw_ms_over_floor_ms"] = raw_ms / parts[5]
        print(table(["case (groups x completions)", "KB/msg", "mode", "msg/s", "traj/s", "MB/s",
                     "x raw", "x no CURVE"], rows))
        print(f"messages per repetition: {[max(10, int(c.messages * args.scale)) for c in CASES]}"
              f", repetitions: {args.reps} (medians), durable log "
              f"{'off' if args.no_durable else 'on'}; target: asyncrl >= 0.5 x raw\n")
        print("where the receiver's time goes, ms per message, best of 3 on one core (msgpack "
              "columns cumulative, wire.decode includes the CRC); the floor is what a receiver "
              "that checks nothing still does (CRC + msgpack with arrays + durable append); "
              "then what ZeroMQ needs to move the message (raw) and raw / floor, the most any "
              "such receiver can reach in x raw:")
        print(table(["case", "crc32", "msgpack, arrays as bytes", "+ numpy arrays",
                     "wire.decode (all checks, groups built)", "durable append",
                     "floor", "handler (no sockets)", "raw ms/msg", "raw / floor"], costs))
        for client in clients.values():
            client.close()
        common.write_json(args.json, figures, ratios)
        push.close(linger=0)
        done.close(linger=0)
    finally:
        for c in children:
            c.terminate()
            c.join(5)
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

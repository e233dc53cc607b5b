"""Helpers shared by the benchmark scripts: ports, the machine line, tables, the tiny model
(asyncrl.testing's)."""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import time
from pathlib import Path

from asyncrl.testing import build_tiny_model as build_tiny_model  # the benchmarks' tiny model


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring: first paragraph, then the rest."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n\n", 1)[1])


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON, each target "
                   "ratio under `ratios`, named for what it divides by what")


def write_json(path: str | None, figures: dict, ratios: dict[str, float]) -> None:
    """`{"machine", "figures", "ratios"}` to path (nothing when path is None)."""
    if path:
        import json

        Path(path).write_text(json.dumps({"machine": machine(), "figures": figures,
                                          "ratios": ratios}, indent=1) + "\n")
        print(f"figures written to {path}")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What the whole-run benchmarks (async_vs_sync, trl_grpo) share."""
    p.add_argument("overrides", nargs="*", help="key=value overrides for both sides")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--target", type=float, default=0.75, help="held-out accuracy to reach")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports: a listening port inside it can
    be taken first by any outgoing connection on the machine (the run's own included)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999  # Linux's default
    return range(lo, hi + 1)


def run_port_offsets(num_generators: int = 4, nproc: int = 4) -> list[int]:
    """Every offset from net.base_port that a run with this many generators and learner ranks
    binds, read from NetConfig's port properties, so a port added there is covered here."""
    from asyncrl.config import NetConfig

    net = NetConfig(base_port=0)
    fixed = [getattr(net, n) for n, v in vars(NetConfig).items()
             if isinstance(v, property) and n.endswith("_port")]
    return sorted({*fixed, *(net.generator_metrics_port(i) for i in range(num_generators)),
                   *(net.learner_metrics_port(r) for r in range(nproc)),
                   *(net.endpoint_port(i) for i in range(num_generators))})


def free_block(offsets: list[int], block: int = 200) -> int:
    """A multiple of `block` whose every `base + offset` is free on this machine right now and
    whose whole block lies outside the ephemeral range (and above 10000, where well-known
    services live). The block holds a run's whole span (PORT_SPAN), so blocks never overlap
    and every base is one net.base_port accepts."""
    from asyncrl.config import PORT_SPAN

    if block < PORT_SPAN or max(offsets) >= block:
        raise ValueError(f"a block of {block} ports cannot hold a run's {PORT_SPAN} "
                         f"or offset {max(offsets)}")
    eph = ephemeral_ports()
    bases = [b for b in range(10000, 65536 - block + 1, block)
             if b + block <= eph.start or b > eph.stop - 1]
    if not bases:
        raise RuntimeError(f"the ephemeral range {eph.start}-{eph.stop - 1} leaves no block of "
                           f"{block} ports (see /proc/sys/net/ipv4/ip_local_port_range)")
    rng = random.Random()
    for _ in range(200):
        base = rng.choice(bases)
        if all(_port_free(base + o) for o in offsets):
            return base
    raise RuntimeError(f"no free block of {block} ports outside the ephemeral range "
                       f"{eph.start}-{eph.stop - 1}")


def free_base_port(num_generators: int = 4, nproc: int = 4) -> int:
    """A net.base_port whose every port for up to this many generators and learner ranks is free,
    outside the kernel's ephemeral range so that no outgoing connection (of the run itself or
    of anything else on the machine) can take one of them before the role binds it."""
    return free_block(run_port_offsets(num_generators, nproc))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores ({cpu}), no GPU use, "
            f"load average {load}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list]) -> str:
    """A plain-text table; floats are shown with 3 significant figures unless pre-formatted."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""Helpers shared by the benchmark scripts: ports, the machine line, tables, the tiny model."""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import time
from pathlib import Path


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring: first paragraph, then the rest."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n\n", 1)[1])


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


def free_base_port(num_generators: int = 1, nproc: int = 1) -> int:
    """A net.base_port whose every offset for this many generators and learner ranks is free,
    below the ephemeral range (32768+) so that no outgoing connection of the run itself can
    take one of them first."""
    offsets = [0, 1, 2, 3, 4, 10, *(20 + i for i in range(num_generators)),
               *(60 + r for r in range(nproc))]
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000, 100)
        if all(_port_free(base + o) for o in offsets):
            return base
    raise RuntimeError("no free block of ports in 20000-32000")


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


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """The embedded default's tiny Llama with random weights (no SFT), in hub format."""
    from transformers import AutoTokenizer

    from asyncrl.task.tiny_model import build_model, build_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = build_model(out_dir, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                        seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir

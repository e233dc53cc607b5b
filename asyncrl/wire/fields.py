"""The wire's bounds, its error, and the field types a message's schema is written in.

Each field type's `check(value, where, vocab_size, build)` returns what the receiver gets
(the value itself, or for `groups` the TrajectoryGroups when `build`), or raises MessageError.
`type(v) is int` rather than isinstance: a bool is not a count, and a numpy scalar never
comes out of msgpack (encode turns them into Python numbers first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INT64_MAX = 2**63 - 1
MAX_VERSION = 2**40 - 1  # policy versions: optimizer steps
MAX_NAME = 64  # sender, incarnation, session, generator: dict keys and metric labels
MAX_REASON = 1024  # free text: reasons, errors
MAX_GROUPS_PER_REQUEST = 2**20  # a batch of more would not fit in MAX_FRAME_BYTES anyway
MAX_RANKS = 2**16  # learner ranks, weight-sync ranks
# The dtypes asyncrl/sync/weights.py can broadcast, and their sizes in bytes.
WEIGHT_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_TENSORS = 2**18  # tensors in one weights_update (a 670B MoE checkpoint has ~10**5)
MAX_TENSOR_NAME = 512
MAX_TENSOR_DIMS = 8
MAX_TENSOR_DIM = 2**40
MAX_BUCKET_BYTES = 2**36  # 64 GiB: weight_sync.bucket_mb's bound
DEFAULT_BUCKET_BYTES = 64 << 20  # weight_sync.bucket_mb's default, for callers without a config
MAX_WEIGHT_BYTES = 2**41  # 2 TiB: the wire's bound; a generator also checks its own model's


class MessageError(ValueError):
    """A frame that is not a valid message. `reason` is a short label for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _type_name(v: Any) -> str:
    return type(v).__name__


def _brief(v: Any) -> str:
    """A received value for an error message: never repr() of a container, which may be nested
    deeper than repr can recurse."""
    if type(v) in (str, bytes):
        return repr(v[:40])
    return repr(v) if type(v) is int else f"<{_type_name(v)}>"


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int  # inclusive
    reason: str = "bad_value"  # label when out of range

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> int:
        if type(v) is not int:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not int")
        if not self.lo <= v <= self.hi:
            raise MessageError(self.reason, f"{where}={v} outside [{self.lo}, {self.hi}]")
        return v


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> float:
        if type(v) not in (int, float):
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not float")
        if not (math.isfinite(v) and self.lo <= v <= self.hi):
            raise MessageError("bad_value", f"{where}={v} not finite in [{self.lo}, {self.hi}]")
        return v


@dataclass(frozen=True)
class Str:
    max_len: int
    choices: tuple[str, ...] = ()  # when given, the only values allowed
    nonempty: bool = False

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> str:
        if type(v) is not str:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not str")
        if len(v) > self.max_len:
            raise MessageError("bad_value", f"{where} longer than {self.max_len} characters")
        if self.choices and v not in self.choices:
            raise MessageError("bad_value", f"{where}={v!r} not one of {self.choices}")
        if self.nonempty and not v:
            raise MessageError("bad_value", f"{where} is empty")
        return v


@dataclass(frozen=True)
class TensorSpecs:
    """`[[name, dtype, shape], ...]`: what a weights_update broadcast holds, in order. Each
    piece is tested inline (a 0.5B model has ~290 specs, the bound is 2**18); the field types
    below say why when a test fails."""

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> list:
        if type(v) is not list:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not a list")
        if len(v) > MAX_TENSORS:
            raise MessageError("bad_value", f"{where}: {len(v)} tensors > {MAX_TENSORS}")
        names: set[str] = set()
        total = 0
        for i, spec in enumerate(v):
            if type(spec) is not list or len(spec) != 3:
                raise MessageError("bad_value", f"{where}[{i}] is not [name, dtype, shape]")
            name, dtype, shape = spec
            if type(name) is not str or not 0 < len(name) <= MAX_TENSOR_NAME:
                _TENSOR_NAME.check(name, f"{where}[{i}].name", vocab_size, build)
            if type(dtype) is not str or dtype not in WEIGHT_DTYPES:
                _TENSOR_DTYPE.check(dtype, f"{where}[{i}].dtype", vocab_size, build)
            if type(shape) is not list or len(shape) > MAX_TENSOR_DIMS:
                raise MessageError("bad_value", f"{where}[{i}].shape is not a list of <= "
                                                f"{MAX_TENSOR_DIMS} sizes")
            count = 1
            for d, size in enumerate(shape):
                if type(size) is not int or not 0 <= size <= MAX_TENSOR_DIM:
                    _TENSOR_DIM.check(size, f"{where}[{i}].shape[{d}]", vocab_size, build)
                count *= size
            if name in names:
                raise MessageError("bad_value", f"{where}[{i}]: tensor {name!r:.80} listed "
                                                "twice")
            names.add(name)
            total += count * WEIGHT_DTYPES[dtype]
            if total > MAX_WEIGHT_BYTES:
                raise MessageError("bad_value", f"{where} describe more than "
                                                f"{MAX_WEIGHT_BYTES} bytes")
        return v


_TENSOR_NAME = Str(MAX_TENSOR_NAME, nonempty=True)
_TENSOR_DTYPE = Str(16, choices=tuple(WEIGHT_DTYPES))
_TENSOR_DIM = Int(0, MAX_TENSOR_DIM)


def spec_bytes(specs: list) -> int:
    """Bytes a weights_update's (checked) tensor specs describe."""
    return sum(math.prod(shape) * WEIGHT_DTYPES[dt] for _, dt, shape in specs)



@dataclass(frozen=True)
class IpcHandles:
    """The CUDA IPC handles of a colocated push (asyncrl/sync/ipc.py): one map per packed
    buffer with exactly these fields; [] for a broadcast."""

    FIELDS = {"dtype": Str(16, choices=tuple(WEIGHT_DTYPES)), "numel": Int(0, MAX_TENSOR_DIM),
              "offset": Int(0, MAX_TENSOR_DIM), "device_uuid": Str(MAX_NAME),
              "handle": None, "storage_size": Int(0, MAX_WEIGHT_BYTES),
              "storage_offset": Int(0, MAX_WEIGHT_BYTES), "ref_handle": None,
              "ref_offset": Int(0, INT64_MAX), "event_handle": None, "event_sync": None}

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> list:
        if type(v) is not list or len(v) > len(WEIGHT_DTYPES):
            raise MessageError("bad_value", f"{where} is not a list of <= "
                                            f"{len(WEIGHT_DTYPES)} handles")
        for i, h in enumerate(v):
            if type(h) is not dict or set(h) != set(self.FIELDS):
                raise MessageError("bad_value", f"{where}[{i}] is not a handle map")
            for key, field in self.FIELDS.items():
                x = h[key]
                if field is not None:
                    field.check(x, f"{where}[{i}].{key}", vocab_size, build)
                elif key == "event_sync" and type(x) is not bool:
                    raise MessageError("bad_type", f"{where}[{i}].{key} is not a bool")
                elif key != "event_sync" and (type(x) is not bytes or len(x) > 4096):
                    raise MessageError("bad_type", f"{where}[{i}].{key} is not bytes <= 4096")
        return v



@dataclass(frozen=True)
class AdapterSpec:
    """A weights_update's LoRA adapter: {} for a push of the weights themselves, else exactly
    {"r", "lora_alpha", "target_modules"}, from which the generator writes the adapter's
    adapter_config.json (asyncrl/lora.py). Its tensors must then be adapter tensors."""

    RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's (config.schema.LORA_RANKS)
    MAX_TARGETS = 64

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> dict:
        if type(v) is not dict:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not a map")
        if not v:
            return v
        if set(v) != {"r", "lora_alpha", "target_modules"}:
            raise MessageError("bad_value", f"{where} has keys other than r, lora_alpha, "
                                            "target_modules")
        if type(v["r"]) is not int or v["r"] not in self.RANKS:
            raise MessageError("bad_value", f"{where}.r is not one of {self.RANKS}")
        _ALPHA.check(v["lora_alpha"], f"{where}.lora_alpha", vocab_size, build)
        targets = v["target_modules"]
        if type(targets) is not list or not 0 < len(targets) <= self.MAX_TARGETS:
            raise MessageError("bad_value", f"{where}.target_modules is not a list of 1.."
                                            f"{self.MAX_TARGETS} names")
        for i, t in enumerate(targets):
            if type(t) is not str or not t.isidentifier() or len(t) > MAX_NAME:
                raise MessageError("bad_value", f"{where}.target_modules[{i}] is not a "
                                                "module name")
        return v


_ALPHA = Float(1e-9, 1e6)


MAX_TEXTS = 2**16  # texts in one score_request: a generator's group or window, with room
MAX_TEXT_CHARS = 2**20  # one prompt or completion (MAX_FRAME_BYTES bounds the total anyway)


@dataclass(frozen=True)
class Texts:
    """A list of at most MAX_TEXTS strings of at most MAX_TEXT_CHARS characters each."""

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> list:
        if type(v) is not list:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not a list")
        if len(v) > MAX_TEXTS:
            raise MessageError("bad_value", f"{where}: {len(v)} texts > {MAX_TEXTS}")
        for i, t in enumerate(v):
            if type(t) is not str:
                raise MessageError("bad_type", f"{where}[{i}] is {_type_name(t)}, not str")
            if len(t) > MAX_TEXT_CHARS:
                raise MessageError("bad_value", f"{where}[{i}] longer than {MAX_TEXT_CHARS} "
                                                "characters")
        return v


@dataclass(frozen=True)
class Floats:
    """A list of at most MAX_TEXTS finite numbers (the scores of a score_request's texts)."""

    def check(self, v: Any, where: str, vocab_size: int | None, build: bool) -> list:
        if type(v) is not list:
            raise MessageError("bad_type", f"{where} is {_type_name(v)}, not a list")
        if len(v) > MAX_TEXTS:
            raise MessageError("bad_value", f"{where}: {len(v)} numbers > {MAX_TEXTS}")
        for i, x in enumerate(v):
            if type(x) not in (int, float):
                raise MessageError("bad_type", f"{where}[{i}] is {_type_name(x)}, not float")
            if not math.isfinite(x):
                raise MessageError("bad_value", f"{where}[{i}]={x} is not finite")
        return v

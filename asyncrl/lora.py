"""LoRA adapters on the policy (model.lora): what the learner trains instead of the weights.

Each target linear layer (peft's names: q_proj, v_proj, ...) is replaced by a `LoraLinear`
that keeps the layer's own `weight` and `bias` (frozen, under their old names) and adds
y += dropout(x) A^T B^T * alpha / r, with A (r x in) initialised as peft does and B (out x r)
zero, so the adapted model starts equal to the base. Only A and B are trained; the reference
policy for the KL term is the same model with the adapters switched off (`adapters_off`): no
second copy of the weights.

The adapter travels and is saved in peft's format: tensors named
`base_model.model.<module>.lora_A.weight` and `.lora_B.weight` with an adapter_config.json,
which peft's PeftModel and vLLM's LoRA loader (a LoRARequest's directory) both read. The
learner's own tensor names are the module paths with `.lora_A.weight` / `.lora_B.weight`, so
`peft_name` only adds the prefix.

Our own module rather than peft's wrapper: the policy stays the transformers model it was
(names, save_pretrained, FSDP2's per-layer sharding, the logprob head swap of
asyncrl/learner/model.py), and a checkpoint of the base layers is the base's.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraLinear(torch.nn.Module):
    """A linear layer plus a low-rank update. `weight` and `bias` are the wrapped layer's own
    parameters (same objects, same names in the state dict)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False,
                                      device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False,
                                      device=base.weight.device, dtype=base.weight.dtype)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default
        torch.nn.init.zeros_(self.lora_B.weight)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.lora_A.out_features}, scaling={self.scaling:g}")


def linear_names(model: torch.nn.Module) -> set[str]:
    """The last name of every linear layer (what model.lora.target_modules picks from)."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def apply(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
          targets: Iterable[str]) -> list[str]:
    """Replace every linear layer whose last name is in `targets` with a LoraLinear, freeze
    everything else. Returns the module paths adapted (ValueError naming the targets no layer
    has). The lm_head is never adapted (vLLM loads it as a LoRA of the logits, peft as a
    linear: they would differ)."""
    targets = list(targets)
    missing = sorted(set(targets) - linear_names(model))
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} is not a linear layer of this "
                         f"model (it has {sorted(linear_names(model))})")
    model.requires_grad_(False)
    adapted = []
    for path, module in list(model.named_modules()):
        name = path.rsplit(".", 1)[-1]
        if name in targets and isinstance(module, torch.nn.Linear) and name != "lm_head":
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, name, LoraLinear(module, rank, alpha, dropout))
            adapted.append(path)
    return adapted


def layers(model: torch.nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def is_adapted(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Within this context the model is its base: the reference policy."""
    ls = layers(model)
    for m in ls:
        m.enabled = False
    try:
        yield model
    finally:
        for m in ls:
            m.enabled = True


def is_adapter_tensor(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def is_peft_adapter_tensor(name: str) -> bool:
    """A tensor name of a peft-format adapter as pushes and files carry it."""
    return name.startswith(PEFT_PREFIX) and is_adapter_tensor(name)


def peft_name(name: str) -> str:
    """The learner's tensor name in peft's file format."""
    return PEFT_PREFIX + name


def learner_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def adapter_tensors(named: Iterable[tuple[str, torch.Tensor]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter's tensors of a state dict's (name, tensor) pairs, in peft's names."""
    for name, t in named:
        if is_adapter_tensor(name):
            yield peft_name(name), t


def adapter_config(rank: int, alpha: float, dropout: float, targets: Iterable[str],
                   base: str = "") -> dict:
    """adapter_config.json as peft writes it for a plain LoRA (what vLLM checks too)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
            "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base}


def wire_adapter(lora_cfg) -> dict | None:
    """What a push's weights_update says of the adapter (model.lora), or None when off."""
    if not lora_cfg.rank:
        return None
    return {"r": lora_cfg.rank, "lora_alpha": float(lora_cfg.alpha),
            "target_modules": sorted(lora_cfg.target_modules)}


def config_from_wire(adapter: dict, base: str = "") -> dict:
    """adapter_config.json for a pushed adapter (the weights_update's `adapter` field)."""
    return adapter_config(adapter["r"], adapter["lora_alpha"], 0.0, adapter["target_modules"],
                          base)


def config_of(model: torch.nn.Module, base: str = "") -> dict:
    """adapter_config.json of an adapted model, read from its LoraLinear layers."""
    paths = [p for p, m in model.named_modules() if isinstance(m, LoraLinear)]
    if not paths:
        raise ValueError("the model has no LoRA adapters")
    first = model.get_submodule(paths[0])
    rank = first.lora_A.out_features
    dropout = first.dropout.p if isinstance(first.dropout, torch.nn.Dropout) else 0.0
    return adapter_config(rank, first.scaling * rank, dropout,
                          {p.rsplit(".", 1)[-1] for p in paths},
                          base or getattr(getattr(model, "config", None), "_name_or_path", ""))


def save_adapter(out: str | Path, config: dict,
                 tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """Write a peft-format adapter directory (tensors already in peft's names)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return out


def load_adapter(model: torch.nn.Module, path: str | Path) -> int:
    """Copy a peft-format adapter's tensors into an adapted model; returns how many. Every
    adapter tensor of the model must be in the file, with its shape (ValueError otherwise)."""
    from safetensors.torch import load_file

    got = {learner_name(n): t for n, t in load_file(str(Path(path) / ADAPTER_WEIGHTS)).items()}
    own = {n: p for n, p in model.named_parameters() if is_adapter_tensor(n)}
    if set(got) != set(own):
        raise ValueError(f"adapter {path}: its tensors do not match the model's adapter "
                         f"(missing {sorted(set(own) - set(got))[:3]}, unexpected "
                         f"{sorted(set(got) - set(own))[:3]})")
    with torch.no_grad():
        for n, p in own.items():
            if got[n].shape != p.shape:
                raise ValueError(f"adapter {path}: {n} has shape {list(got[n].shape)}, the "
                                 f"model's is {list(p.shape)} (another rank?)")
            p.copy_(got[n])
    return len(own)


def merged_state(named: Iterable[tuple[str, torch.Tensor]], scaling: float
                 ) -> dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its base weight, W + B A * scaling, and
    the adapter tensors gone: the merged model in the base's names."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        if is_adapter_tensor(name):
            module, which = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            pending.setdefault(module, {})[which] = t
        else:
            out[name] = t
    for module, ab in pending.items():
        w = out[f"{module}.weight"]
        delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scaling
        out[f"{module}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merge_into(adapter_dir: str | Path, base_dir: str | Path, out: str | Path) -> Path:
    """Hub-format weights of `base_dir` with the peft-format adapter at `adapter_dir` folded
    in, written to `out` with the base's tokenizer (for what reads whole models: the win
    rate against the SFT policy, users' own tools)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    apply(model, config["r"], config["lora_alpha"], 0.0, config["target_modules"])
    load_adapter(model, adapter_dir)
    merged = merged_state(model.state_dict().items(), config["lora_alpha"] / config["r"])
    model.save_pretrained(out, state_dict=merged, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return Path(out)


"""LoRA: low-rank adapters on ``nn.Linear`` layers, trained on a frozen base, then merged.

Two paths. For the built-in models (mlp, cnn, transformer, gpt) a small implementation,
here: they are plain ``nn.Module``s, and this keeps them free of transformers. For ``hf:``
models (transformers), ``peft`` does it (see :class:`tasks.models.hf.HFCausalLM`): it knows
every architecture's layer types and merges exactly; :func:`apply_lora` and
:func:`merge_lora` hand such a model to it.
``LoRALinear(x) = W x + b + (alpha / r) * B (A x)`` with ``B`` zero at the start, so a
fresh adapter leaves the model's outputs unchanged.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from storage.errors import ConfigError

ADAPTER_KEYS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches ``targets``; freeze everything else."""
    if hasattr(model, "apply_lora"):  # an hf: model: peft
        return model.apply_lora(rank, alpha, targets)
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise ConfigError(f"lora_targets {targets!r} is not a valid regex: {exc}") from None
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    chosen = [name for name in linear if pattern.search(name)]
    if not chosen:
        raise ConfigError(f"lora_targets {targets!r} matches no Linear layer; the model's Linear layers: {', '.join(linear)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        base = model.get_submodule(name)
        _set_child(model, name, LoRALinear(base, rank, alpha))
    return chosen


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: what a LoRA run saves on its own."""
    return {k: v for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ADAPTER_KEYS or re.search(r"\.lora_[AB]\.", k)}  # ours, or peft's


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base layer, in place; returns the merged layer names."""
    if hasattr(model, "merge_lora"):  # an hf: model: peft
        return model.merge_lora()
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_child(model, name, model.get_submodule(name).merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return names

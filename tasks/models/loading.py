"""Load a trained model for evaluation or inference from a checkpoint URL.

Accepts a checkpoint folder (``…/ckpt-000000123``) or a checkpoint root (its latest
checkpoint). The checkpoint's metadata names the model factory and its arguments and
any LoRA adapters, so the model is rebuilt exactly; weights come from safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage import checkpoint as ckpt
from tasks.models import build_model


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module, in eval mode
    name: str
    args: dict[str, Any]
    url: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> dict[str, Any]:
        """Input/label columns and feature shape/scale the model was trained with."""
        return self.meta.get("columns") or {}


def load_model(url: str, storage_options: dict | None = None) -> LoadedModel:
    resolved = ckpt.resolve(url, storage_options)
    tensors, meta = ckpt.load(resolved, storage_options)
    spec = meta.get("model") or {}
    model = build_model(spec.get("name", ""), spec.get("args") or {})
    lora = meta.get("lora")
    if lora:
        from tasks.training.lora import apply_lora

        apply_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model, spec.get("name", ""), spec.get("args") or {}, resolved, meta)

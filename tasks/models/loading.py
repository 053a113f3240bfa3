"""Load a trained or optimized model for evaluation or inference from its URL.

Accepts a checkpoint folder (``…/ckpt-000000123``), a checkpoint root (its latest
checkpoint) or an optimized model folder written by ``swarm optimize``. The metadata
names the model factory and its arguments, any LoRA adapters, and for an optimized model
the optimizations to re-apply (int8 layers, a reduced dtype; pruned widths are in the
arguments), so the model is rebuilt exactly; weights come from safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage import checkpoint as ckpt
from storage.errors import ConfigError
from tasks.models import build_model


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module, in eval mode; a reduced-precision model casts fp32 inputs itself
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
    tensors, meta = ckpt.load(resolved, storage_options, formats=(ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID))
    spec = meta.get("model") or {}
    name, args = spec.get("name", ""), spec.get("args") or {}
    build_args = args
    if name.startswith("hf:") and (meta.get("hf") or {}).get("config"):  # rebuilt from its recorded config
        build_args = {**args, "config": meta["hf"]["config"]}
    steps = meta.get("optimizations") or []
    if meta.get("format") == ckpt.MODEL_FORMAT_ID:
        from tasks.optimize.artifact import rebuild

        model = rebuild(name, build_args, steps)
    else:
        model = build_model(name, build_args, from_checkpoint=True)
        lora = meta.get("lora")
        if lora:
            from tasks.training.lora import apply_lora

            apply_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(
            f"the tensors of {resolved!r} do not fit model {name!r} with arguments {args} "
            f"(a checkpoint of another architecture?): {detail[:600]}"
        ) from None
    if steps:
        from tasks.optimize.artifact import for_inference

        model = for_inference(model, steps)
    model.eval()
    return LoadedModel(model, name, args, resolved, meta)

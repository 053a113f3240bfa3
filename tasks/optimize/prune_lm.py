"""Structured pruning of a language model's MLP width (the FFN hidden units of every block).

A unit's importance is the norm of the weights that produce it times the norm of the
weights that read it (for a gated MLP, the gate's and the up projection's rows both
produce it). Every block keeps the same number of units, the most important of its own,
so the model is rebuilt with one smaller width: the built-in GPT's ``d_ff`` argument, or
an ``hf:`` model's config (``intermediate_size`` for Llama-family, ``n_inner`` for GPT-2,
whose ``Conv1D`` layers store weights as (in, out)).
"""

from __future__ import annotations

from typing import Any

import torch

from storage.errors import ConfigError


def _keep(score: torch.Tensor, amount: float) -> torch.Tensor:
    return score.topk(max(1, round(len(score) * (1 - amount)))).indices.sort().values


def gpt_mlp(model, state: dict[str, torch.Tensor], args: dict[str, Any], amount: float) -> dict[str, Any]:
    width = None
    for i in range(len(model.blocks)):
        fc, proj = f"blocks.{i}.mlp.fc", f"blocks.{i}.mlp.proj"
        keep = _keep(state[f"{fc}.weight"].norm(dim=1) * state[f"{proj}.weight"].norm(dim=0), amount)
        state[f"{fc}.weight"] = state[f"{fc}.weight"][keep]
        if f"{fc}.bias" in state:
            state[f"{fc}.bias"] = state[f"{fc}.bias"][keep]
        state[f"{proj}.weight"] = state[f"{proj}.weight"][:, keep]
        width = len(keep)
    return {**args, "d_ff": width}


def _hf_blocks(model) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules()
            if name.endswith(".mlp") and (hasattr(m, "down_proj") or hasattr(m, "c_fc"))]


def hf_mlp(model, state: dict[str, torch.Tensor], args: dict[str, Any], amount: float) -> dict[str, Any]:
    """An hf: model's MLPs (Llama-family gate/up/down, or GPT-2 c_fc/c_proj); the new width goes
    into the recorded config, which rebuilds the model."""
    config = model.model.config.to_dict()
    blocks = _hf_blocks(model)
    if not blocks:
        raise ConfigError(f"structured pruning of hf: models knows Llama-family (gate/up/down_proj) and GPT-2 "
                          f"(c_fc/c_proj) MLPs; model type {config.get('model_type')!r} has neither")
    width = None
    for name, mlp in blocks:
        if hasattr(mlp, "down_proj"):  # Linear: (out, in)
            gate, up, down = (f"{name}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
            score = state[gate].norm(dim=1) * state[up].norm(dim=1) * state[down].norm(dim=0)
            keep = _keep(score, amount)
            state[gate], state[up], state[down] = state[gate][keep], state[up][keep], state[down][:, keep]
            for p in ("gate_proj", "up_proj"):
                if f"{name}.{p}.bias" in state:
                    state[f"{name}.{p}.bias"] = state[f"{name}.{p}.bias"][keep]
            key = "intermediate_size"
        else:  # GPT-2 Conv1D: (in, out)
            fc, proj = f"{name}.c_fc.weight", f"{name}.c_proj.weight"
            keep = _keep(state[fc].norm(dim=0) * state[proj].norm(dim=1), amount)
            state[fc], state[f"{name}.c_fc.bias"] = state[fc][:, keep], state[f"{name}.c_fc.bias"][keep]
            state[proj] = state[proj][keep]
            key = "n_inner"
        width = len(keep)
    config[key] = width
    return {**args, "config": config}

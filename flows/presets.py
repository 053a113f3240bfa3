"""Named starting points of the lifecycle: ``digits`` (the default) and ``text``.

A preset gives every option it cares about a value; an option the caller sets (to anything
but its plain default) wins over the preset's. ``text`` stages the interpreter's help
(``python-help``) with a byte-level BPE fitted on its train split, trains the built-in GPT
on it (small batches, warmup and a cosine schedule: ~300 optimizer steps, a few minutes on
two CPU cores), optimizes it (int8 dynamic, gated on validation perplexity) and generates
continuations of validation prompts instead of classifier predictions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

Preset = Literal["digits", "text"]

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {},
    "text": {
        "data": {"source": "python-help", "vocab_size": 2048, "seq_len": 128, "val_fraction": 0.1},
        "training": {"model": "gpt", "task": "causal-lm", "epochs": 5, "batch_size": 16, "lr": 2e-3,
                     "warmup_steps": 30, "lr_schedule": "cosine"},
        "optimization": {"quantize": "int8-dynamic"},
    },
}


def apply_preset(name: str, section: str, given: BaseModel, default: BaseModel) -> BaseModel:
    """``given`` with the preset's value for every field the caller left at ``default``'s value."""
    values = PRESETS[name].get(section, {})
    if not values:
        return given
    unset = {k: v for k, v in values.items() if getattr(given, k) == getattr(default, k)}
    return given.model_copy(update=unset) if unset else given

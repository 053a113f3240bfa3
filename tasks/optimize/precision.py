"""Precision: weights cast to bf16 or fp16, behind a wrapper that feeds them matching inputs."""

from __future__ import annotations

import torch
from torch import nn

from storage.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CastInputs(nn.Module):
    """Runs a reduced-precision model on the inputs inference has (fp32 features, integer
    pixels or token ids): inputs are cast to the weights' dtype, except the token ids of a
    model that embeds them, and logits come back as fp32 so callers need not care."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.takes_indices = any(isinstance(m, nn.Embedding) for m in inner.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() or not self.takes_indices:
            x = x.to(self.dtype)
        return self.inner(x).float()


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def cast_model(model: nn.Module, name: str) -> CastInputs:
    """Cast the weights in place and wrap the model for inference."""
    dtype = dtype_of(name)
    return CastInputs(model.to(dtype), dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose state is stored: the wrapped one for a cast model."""
    return model.inner if isinstance(model, CastInputs) else model

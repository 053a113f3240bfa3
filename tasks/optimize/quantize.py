"""int8 quantization of ``nn.Linear`` layers, stored as plain tensors (never pickles).

Weights are symmetric per-output-channel int8 (``scale = max|row| / 127``). A quantized
layer's state is ``weight_int8`` (int8), ``weight_scale`` (fp32) and ``bias`` (fp32):
ordinary tensors that safetensors stores as they are. Loading rebuilds the layers from
the names in the artifact's metadata and prepares the kernel from those tensors, so the
stored format does not depend on the kernel.

Kernels, chosen by measurement on this x86 CPU (figures in BENCHMARKS.md):

- ``int8-dynamic``: torch's fbgemm/x86 ``quantized::linear_dynamic`` (activations are
  quantized per batch inside the kernel): 3.2-4.6x fp32 at batch 64 on wide MLPs.
  torchao's ``Int8DynamicActivationInt8WeightConfig`` is the maintained front end, but
  its wheel ships no CPU kernels: eager it runs ``torch._int_mm`` at 1.1-1.8x (0.1x on
  small layers) and needs ``torch.compile`` (5-25 s per shape) to reach 1.9-4.6x. The
  only deprecated piece used here is the qint8 tensor that packing takes (torch
  deprecates quantized dtypes with ``torch.ao.quantization``); it is confined to
  :meth:`Int8Linear._prepare`. Should torch remove it, that one method changes (e.g.
  to onednn's ``qlinear_prepack``, which takes plain int8 and measured 1.6-4.2x).
- ``int8-weight-only``: ``aten._weight_int8pack_mm`` with bf16 activations (3.6x fp32 at
  batch 1 on a 2048-wide MLP, ~0.9x at batch 64: it saves memory traffic, not
  arithmetic). That kernel is only correct when ``in_features % 16 == 0`` (it crashes
  otherwise), so other layers dequantize per call, torchao's CPU algorithm.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from storage.errors import ConfigError, ManifestError

MODES = ("int8-dynamic", "int8-weight-only")
SCALE_SUFFIX = "weight_scale"  # quantization metadata, not a model parameter
_PACK_K = 16


def _no_fused_path(module: nn.Module, args):
    """A hook's presence keeps fused kernels that read ``.weight`` directly (such as
    ``nn.TransformerEncoderLayer``'s inference fast path) from bypassing the layer."""
    return None


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with int8 ``W``; takes and returns fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"unknown quantization {mode!r}; allowed: {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer(SCALE_SUFFIX, torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel = None  # prepared from the buffers on first use, dropped when they change
        self.register_forward_pre_hook(_no_fused_path)

    @classmethod
    def from_linear(cls, linear: nn.Module, mode: str) -> "Int8Linear":
        in_features, out_features = _linear_shape(linear)
        layer = cls(in_features, out_features, linear.bias is not None, mode)
        w = linear.weight.detach().float()
        if not isinstance(linear, nn.Linear):  # transformers' Conv1D (GPT-2) stores (in, out)
            w = w.t()
        scale = w.abs().amax(dim=1).clamp_(min=1e-12) / 127
        with torch.no_grad():
            layer.weight_int8.copy_(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel = None

    def _apply(self, fn, *args, **kwargs):
        self._kernel = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_kernel": None}  # packed weights are rebuilt, never copied or pickled

    def _prepare(self):
        if self.mode == "int8-dynamic":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantized tensor creation.*|.*are deprecated.*")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.weight_scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qweight, self.bias)
        if self.in_features % _PACK_K == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return self.weight_scale.to(torch.bfloat16)
        return None  # dequantize per call

    def prepare(self) -> None:
        """Pack the kernel's weights now rather than on the first call (a loader's warm-up)."""
        if self._kernel is None:
            self._kernel = self._prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare()
        if x.dtype != torch.float32:
            x = x.float()
        if self.mode == "int8-dynamic":
            return torch.ops.quantized.linear_dynamic(x, self._kernel, True)
        flat = x.reshape(-1, self.in_features)
        if self._kernel is not None:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), self.weight_int8,
                                                   self._kernel).float()
        else:
            y = (flat @ self.weight_int8.t().to(flat.dtype)).mul_(self.weight_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linear layers, weight (in, out)), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def quantizable_layers(model: nn.Module) -> list[str]:
    """``nn.Linear`` (and GPT-2 ``Conv1D``) layers that can be swapped: all but attention's
    ``out_proj``, whose weight ``nn.MultiheadAttention`` reads directly instead of calling the
    layer, and an output head tied to the token embedding (the embedding keeps the weights)."""
    inside_attention = {f"{name}.{child}" if name else child
                        for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                        for child, _ in m.named_children()}
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and name and name not in inside_attention
            and id(m.weight) not in embedded]


def quantize_model(model: nn.Module, mode: str) -> list[str]:
    """Replace every quantizable ``nn.Linear`` by an :class:`Int8Linear`, in place; returns their names."""
    names = quantizable_layers(model)
    if not names:
        raise ConfigError(f"the model has no Linear layer to quantize ({type(model).__name__})")
    for name in names:
        model.set_submodule(name, Int8Linear.from_linear(model.get_submodule(name), mode))
    return names


def install_int8(model: nn.Module, names: list[str], mode: str) -> None:
    """Empty int8 layers where an artifact says they are; its tensors fill them."""
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not (isinstance(linear, nn.Linear) or _is_conv1d(linear)):
            raise ManifestError(f"the artifact quantizes layer {name!r}, which its model has no Linear layer for")
        model.set_submodule(name, Int8Linear(*_linear_shape(linear), linear.bias is not None, mode))

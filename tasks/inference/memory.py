"""Memory limits for batches: a cap on CPU that fails like an out-of-memory would.

On a GPU a too-large batch raises ``torch.OutOfMemoryError``. On CPU the process would
rather swap or be killed, so a cap in bytes stands in for device memory: a batch whose
estimated activation memory passes it raises :class:`MemoryCapExceeded` (a
``MemoryError``), which the adaptive batch size treats as out-of-memory.
"""

from __future__ import annotations

from dataclasses import dataclass


class MemoryCapExceeded(MemoryError):
    """A batch would need more memory than the configured cap."""


@dataclass(frozen=True)
class MemoryCap:
    limit_bytes: int
    bytes_per_row: int

    def check(self, rows: int) -> None:
        need = rows * self.bytes_per_row
        if need > self.limit_bytes:
            raise MemoryCapExceeded(
                f"out of memory: a batch of {rows} rows needs about {need / 2**20:.1f} MiB of activations, "
                f"over the cap of {self.limit_bytes / 2**20:.1f} MiB"
            )


def activation_bytes_per_row(model, example) -> int:
    """Bytes of every module's output for one row: a batch needs about ``rows`` times this."""
    import torch

    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return max(1, total)

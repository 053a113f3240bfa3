"""Reusable pinned host buffers and the side-stream copies out of them (CUDA only).

The prefetcher keeps one ring per iterator object, so its buffers are reused for every
batch and across epochs; :attr:`PinnedRing.nbytes` is what it holds (reported as the
prefetcher's ``ring_bytes``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from storage.fetcher import MAX_DEPTH


class PinnedRing:
    """Reusable pinned host buffers and the side-stream copies out of them (CUDA only)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.slots: list[dict] = []
        self.current: dict | None = None

    @property
    def nbytes(self) -> int:
        """Pinned bytes held (reused for every batch, across epochs)."""
        return sum(b.numel() * b.element_size() for slot in self.slots for b in slot["buffers"].values())

    def _slot(self) -> dict:
        for slot in self.slots:
            if slot["event"] is None or slot["event"].query():
                break
        else:
            if len(self.slots) < 2 * MAX_DEPTH:
                slot = {"event": None, "buffers": {}}
                self.slots.append(slot)
            else:
                slot = min(self.slots, key=lambda s: s["used"])
                slot["event"].synchronize()
        slot["used"] = time.perf_counter()
        slot["event"] = None
        self.current = slot
        return slot

    def _buffer(self, slot: dict, name: str, shape: tuple, dtype) -> Any:
        torch = self.torch
        buf = slot["buffers"].get(name)
        rows = shape[0]
        if buf is None or buf.shape[1:] != shape[1:] or buf.dtype != dtype or buf.shape[0] < rows:
            buf = torch.empty((max(rows, 1), *shape[1:]), dtype=dtype, pin_memory=True)
            slot["buffers"][name] = buf
        return buf[:rows]

    def provider(self, dataset):
        """Buffers a dataset gathers straight into: its numeric columns without transforms."""
        torch = self.torch
        specs = [s for s in dataset.specs if s.numeric and s.name not in dataset.transforms]

        def out(rows: int) -> dict[str, np.ndarray]:
            slot = self._slot()
            return {s.name: self._buffer(slot, s.name, (rows, *s.shape), _torch_dtype(torch, s.dtype)).numpy()
                    for s in specs}

        return out

    def to_device(self, batch: dict[str, Any]):
        torch = self.torch
        slot = self.current if self.current is not None and self.current["event"] is None else self._slot()
        self.current = None
        out = {}
        with torch.cuda.stream(self.stream):
            for name, value in batch.items():
                if not isinstance(value, torch.Tensor):
                    out[name] = value
                    continue
                host = value if value.is_pinned() else self._buffer(slot, name, tuple(value.shape), value.dtype)
                if host is not value:
                    host.copy_(value)
                out[name] = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        slot["event"] = event
        return out, event

    def hand_over(self, item) -> dict[str, Any]:
        batch, event = item
        stream = self.torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for value in batch.values():
            if isinstance(value, self.torch.Tensor):
                value.record_stream(stream)
        return batch


def _torch_dtype(torch, dtype: np.dtype):
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype

"""Batches gathered on the device from shuffle windows copied there once.

    Prefetcher(ds, device="cuda", gather="device")     # or gather="auto" (device when it fits)

The host path (:mod:`storage.batches`) gathers every batch on the host and copies it to
the device: per-batch host work at the step boundary. Here each shuffle window (the
``block_size`` stream positions a block shuffle permutes within) is gathered on the host
once, in *unshuffled* stream order, into a reusable host buffer (pinned on CUDA), copied
to the device on the side stream with its row permutation (and sample ids), and every
batch is then cut on the device: a slice of the permutation, a sort (a batch's rows are
in stream order, see :func:`storage.order.StreamPlan.run_sources`), one ``index_select``
per column. No per-batch host-to-device copy and no host sync. A batch that straddles two
windows takes its rows from both. The order, exact resume and rank partitioning are the
same functions of :mod:`storage.order` as on the host path (the order tests run both).

It needs numeric columns (as the pinned ring does); a dataset's transforms are applied to
a whole window's rows, so they must be row-wise (scaling, decoding); per-batch tensor
transforms on the device come from ``device_transforms``. One in-process stream only
(``num_workers=0``). It runs on ``device="cpu"`` too (no streams, no pinning), which is
how the tests check it without a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from storage.errors import ConfigError

#: Windows on the device at once: the current one, one a straddling batch also needs, the next.
RESIDENT_WINDOWS = 3
#: The share of free device memory the resident windows may take (auto mode).
DEVICE_SHARE = 0.25


def window_bytes(dataset) -> int:
    """Device bytes of one shuffle window of ``dataset``: its columns, permutation and sample ids."""
    row = sum(s.row_bytes for s in dataset.specs) + 8 + (8 if dataset.index_key else 0)
    return row * dataset.base_spec.block_size


def fits_on_device(need: int, free: int, share: float = DEVICE_SHARE) -> bool:
    """Whether ``need`` bytes stay within ``share`` of ``free`` device bytes."""
    return need <= share * free


def supported(dataset) -> str | None:
    """Why ``dataset`` cannot be gathered on the device, or None when it can."""
    strings = [s.name for s in dataset.specs if not s.numeric]
    if strings:
        return f"column(s) {', '.join(strings)} have no tensor layout"
    return None


@dataclass
class _Window:
    lo: int
    hi: int
    perm: torch.Tensor  # unshuffled local position of each shuffled position in the window
    columns: dict[str, torch.Tensor]


class DeviceGather:
    """One epoch of a dataset's batches, gathered on ``device`` (see the module docstring)."""

    def __init__(self, dataset, device: torch.device, stream=None,
                 device_transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        why = supported(dataset)
        if why is not None:
            raise ConfigError(f"batches cannot be gathered on the device: {why}; use gather='host'")
        self.dataset, self.device, self.stream = dataset, device, stream
        self.cuda = device.type == "cuda"
        self.device_transforms = dict(device_transforms or {})
        self._slots: list[dict[str, Any]] = []  # reusable host buffers, one set per window in flight
        self.copies = 0  # windows copied to the device (for stats and tests)
        self.copy_s = 0.0  # host time spent gathering windows

    @property
    def host_bytes(self) -> int:
        """Bytes held in the reusable host buffers (pinned on CUDA)."""
        return sum(b.nbytes for slot in self._slots for b in slot["buffers"].values())

    def batches(self, consumed: int, fetch_depth: Callable[[], int] | None = None
                ) -> Iterator[Any]:
        """Rank batches ``consumed..`` of the current epoch: ``(batch, copy event)`` on CUDA (for
        :meth:`storage.pinned.PinnedRing.hand_over`), the batch itself elsewhere."""
        ds = self.dataset
        with ds.stream(consumed, 0, 1, fetch_depth) as (plan, reader):
            first = plan.first_batch(consumed)
            offsets, size = plan.offsets, plan.spec.block_size
            windows = reader.blocks(first, out=self._buffers)
            resident: dict[int, _Window] = {}
            counters, made = ds.counters(), 0
            try:
                for i in range(first, len(plan.sizes)):
                    lo, hi = int(offsets[i]), int(offsets[i + 1])
                    needed = range(lo // size, (hi - 1) // size + 1)
                    for old in [k for k in resident if k < needed[0]]:
                        del resident[old]
                    for index in needed:
                        while index not in resident:
                            w_lo, w_hi, arrays = next(windows)
                            resident[w_lo // size] = self._upload(plan, w_lo, w_hi, arrays)
                    batch, event = self._cut([resident[k] for k in needed], lo, hi)
                    made += 1
                    if made == 16:
                        counters.add(0, batches=made)
                        made = 0
                    yield (batch, event) if self.cuda else batch
            finally:
                windows.close()
                if made:
                    counters.add(0, batches=made)

    # ------------------------------------------------------------------ internals

    def _buffers(self, rows: int) -> dict[str, np.ndarray]:
        """Host buffers for a window of ``rows`` (reused once their copy has completed)."""
        for slot in self._slots:
            if slot["event"] is None or slot["event"].query():
                break
        else:
            if len(self._slots) < RESIDENT_WINDOWS:
                slot = {"event": None, "buffers": {}}
                self._slots.append(slot)
            else:
                slot = min(self._slots, key=lambda s: s["used"])
                slot["event"].synchronize()
        slot["used"], slot["event"] = time.perf_counter(), None
        self._current = slot
        out = {}
        for spec in self.dataset.specs:
            out[spec.name] = self._buffer(slot, spec.name, (rows, *spec.shape), spec.dtype)
        out["__perm__"] = self._buffer(slot, "__perm__", (rows,), np.int64)
        if self.dataset.index_key:
            out["__ids__"] = self._buffer(slot, "__ids__", (rows,), np.int64)
        return out

    def _buffer(self, slot: dict, name: str, shape: tuple, dtype) -> np.ndarray:
        buf = slot["buffers"].get(name)
        if buf is None or buf.shape[1:] != tuple(shape[1:]) or buf.dtype != np.dtype(dtype) or len(buf) < shape[0]:
            empty = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            tensor = torch.empty((max(shape[0], 1), *shape[1:]), dtype=empty, pin_memory=self.cuda)
            buf = tensor.numpy()
            slot["buffers"][name] = buf
        return buf[: shape[0]]

    def _upload(self, plan, lo: int, hi: int, arrays: dict) -> _Window:
        started = time.perf_counter()
        slot = self._current
        perm = slot["buffers"]["__perm__"][: hi - lo]
        np.subtract(plan.source_positions(lo, hi), lo, out=perm)
        host = {s.name: arrays[s.name] for s in self.dataset.specs}
        for name, fn in self.dataset.transforms.items():  # row-wise, so a whole window at once
            host[name] = fn(host[name])
        if self.dataset.index_key:
            ids = slot["buffers"]["__ids__"][: hi - lo]
            ids[:] = plan.position_ids(np.arange(lo, hi, dtype=np.int64), self.dataset.shard_offsets)
            host["__ids__"] = ids
        with self._on_stream():
            columns = {k: self._to_device(v) for k, v in host.items()}
            window = _Window(lo, hi, self._to_device(perm), columns)
            if self.cuda:
                slot["event"] = torch.cuda.Event()
                slot["event"].record(self.stream)
        self.copies += 1
        self.copy_s += time.perf_counter() - started
        return window

    def _to_device(self, value) -> torch.Tensor:
        tensor = value if torch.is_tensor(value) else torch.from_numpy(np.ascontiguousarray(value))
        if not self.cuda:
            return tensor.clone() if not torch.is_tensor(value) else tensor  # the host buffer is reused
        return tensor.to(self.device, non_blocking=True)

    def _cut(self, windows: list[_Window], lo: int, hi: int) -> tuple[dict[str, torch.Tensor], Any]:
        with self._on_stream():
            parts = []
            for w in windows:
                a, b = max(lo, w.lo) - w.lo, min(hi, w.hi) - w.lo
                rows = torch.sort(w.perm[a:b]).values
                parts.append({k: v.index_select(0, rows) for k, v in w.columns.items()})
            batch = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if "__ids__" in batch:
                batch[self.dataset.index_key] = batch.pop("__ids__")
            for name, fn in self.device_transforms.items():
                batch[name] = fn(batch[name])
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
        return batch, event

    def _on_stream(self):
        from contextlib import nullcontext

        return torch.cuda.stream(self.stream) if self.cuda and self.stream is not None else nullcontext()



def resolve_gather(gather: str, dataset, device: torch.device, num_workers: int, producer: str) -> str:
    """``host`` or ``device`` for a prefetcher: ``auto`` is device on CUDA where the resident
    windows fit in :data:`DEVICE_SHARE` of the free device memory, else host."""
    if gather not in ("host", "device", "auto"):
        raise ConfigError(f"gather {gather!r} is not allowed; allowed: host, device, auto")
    if gather == "host":
        return "host"
    why = ("the source is not a StreamingDataset" if dataset is None else
           "num_workers > 0 (the device gathers one in-process stream)" if num_workers else
           "producer='process'" if producer != "thread" else supported(dataset))
    if gather == "device":
        if why is not None:
            raise ConfigError(f"gather='device' is not possible here: {why}; use gather='host' or 'auto'")
        return "device"
    if why is not None or device.type != "cuda":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if fits_on_device(RESIDENT_WINDOWS * window_bytes(dataset), free) else "host"

"""Batches ready on the device before the training step asks for them.

    loader = Prefetcher(ds, device="cuda", depth=2, stall_target=0.05)
    loader.load_state_dict(checkpoint["data"])           # optional: resume mid-epoch
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:                             # dicts of device tensors
            step(batch)
            checkpoint["data"] = loader.state_dict()
        log(loader.stats.as_dict())                       # stall share, hit rate, …

Three stages run ahead of the training loop, each bounded:

1. **Shard reads.** The reader knows the epoch's future shard order and keeps
   ``shard_depth`` reads (fetch through the node cache, verify, decode) in flight.
2. **Batches.** A producer thread gathers batches, on CUDA straight into reusable
   pinned host buffers (a ring; a buffer is reused once its copy has completed).
3. **Device copies.** On CUDA each batch is copied on a side stream, so the copy
   overlaps the step's kernels; the consumer's stream waits on the copy's event.
   Without CUDA the same pipeline overlaps reading and decoding with compute.

When an epoch's last batch is made, the first shards of the next epoch (``epoch + 1``,
its order being a pure function) start reading, so an epoch does not begin with a wait.

``depth`` batches wait ready. The consumer's wait for each batch is the step's
*data stall*; :attr:`stats` has it per step, with the cache hit rate and the shard
bytes in flight. With ``stall_target`` (a share of wall time, e.g. 0.05) the depths
grow while the measured stall share is above it.

With ``num_workers > 0`` batches come from a ``DataLoader`` of that many worker
processes (each with its own shard reads); the order then depends on that number.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator


from storage.errors import ConfigError
from storage.fetcher import MAX_DEPTH
from storage.handoff import END, GrowableQueue
from storage.pinned import PinnedRing


@dataclass
class PrefetchStats:
    """What the consumer saw: per-step data stall and the reads behind it."""

    steps: int = 0
    stall_s: float = 0.0
    elapsed_s: float = 0.0
    step_stall_s: list[float] = field(default_factory=list)
    depth: int = 0
    shard_depth: int = 0
    hit_rate: float | None = None
    bytes_in_flight: float = 0.0  # shard bytes being read when the last batch was handed out
    bytes_in_flight_mean: float = 0.0
    bytes_fetched: float = 0.0
    ring_bytes: int = 0  # reusable host buffers batches are gathered into (pinned on CUDA), kept across epochs
    memory_capped: bool = False  # the depth stopped growing for want of device memory
    samples: int = 0
    flight_samples: int = 0
    tuning: list[tuple[int, int, int, float]] = field(default_factory=list)  # (step, depth, shard_depth, share)

    @property
    def stall_share(self) -> float:
        """Share of the iteration's wall time the consumer spent waiting for data."""
        return self.stall_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "samples": self.samples, "stall_s": round(self.stall_s, 4),
            "elapsed_s": round(self.elapsed_s, 4), "stall_share": round(self.stall_share, 4),
            "depth": self.depth, "shard_depth": self.shard_depth,
            "hit_rate": None if self.hit_rate is None else round(self.hit_rate, 4),
            "bytes_in_flight": int(self.bytes_in_flight), "bytes_in_flight_mean": int(self.bytes_in_flight_mean),
            "bytes_fetched": int(self.bytes_fetched), "ring_bytes": int(self.ring_bytes),
            "memory_capped": self.memory_capped,
        }


class Prefetcher:
    """Iterate a :class:`~storage.loader.StreamingDataset` (or any iterable of dicts of
    tensors) with batches prepared ahead, on ``device`` when it is a CUDA device.

    Args:
        source: a ``StreamingDataset``, or any iterable of ``{name: tensor}`` batches.
        device: ``None``/``"cpu"`` (host tensors) or a CUDA device.
        depth: batches kept ready ahead of the consumer.
        num_workers: ``DataLoader`` worker processes (0: read in this process, on threads).
        shard_depth: shard reads in flight (default: the dataset's ``shard_depth``).
        stall_target: grow the depths while the stall share is above this (None: fixed).
        max_depth: the most batches ``depth`` may grow to.
        window: steps between two depth decisions.
        producer: ``"thread"`` (batches made on a thread of this process) or ``"process"``
            (made by a forked child into a shared pinned ring, see :mod:`storage.feed`: on a
            many-core GPU host it keeps the producer off the training thread's GIL).
        gather: ``"host"`` (batches gathered on the host, then copied), ``"device"`` (each
            shuffle window copied to the device once, batches gathered there: see
            :mod:`storage.device_gather`; also on CPU) or ``"auto"`` (device on CUDA when it fits).
        device_transforms: ``{column: fn(tensor)}`` applied on the device to each batch (gather="device").
    """

    def __init__(self, source: Iterable, *, device: Any = None, depth: int = 2, num_workers: int = 0,
                 shard_depth: int | None = None, stall_target: float | None = None, max_depth: int = 16,
                 window: int = 16, mp_context: str | None = None, producer: str = "thread", gather: str = "host",
                 device_transforms: dict | None = None):
        from storage.loader import StreamingDataset

        self.source = source
        self.dataset = source if isinstance(source, StreamingDataset) else None
        if num_workers and self.dataset is None:
            raise ConfigError("num_workers > 0 needs a StreamingDataset source (an iterable is read as it is)")
        if not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"depth must be an integer >= 1, got {depth!r}")
        if stall_target is not None and not 0 < stall_target < 1:
            raise ConfigError(f"stall_target is a share of wall time between 0 and 1 (e.g. 0.05), got {stall_target!r}")
        if producer not in ("thread", "process"):
            raise ConfigError(f"producer {producer!r} is not allowed; allowed: thread, process")
        if producer == "process" and (self.dataset is None or num_workers):
            raise ConfigError("producer='process' needs a StreamingDataset source and num_workers=0 "
                              "(it is the producer process itself)")
        if producer == "process" and not hasattr(os, "fork"):
            raise ConfigError("producer='process' needs os.fork (Linux or macOS); use producer='thread'")
        self.producer = producer
        self.device = _device(device)
        self.depth = depth
        self.max_depth = max(depth, max_depth)
        self.num_workers = int(num_workers)
        self.shard_depth = shard_depth or (self.dataset.shard_depth if self.dataset else 0)
        self.stall_target = stall_target
        self.window = window
        self.mp_context = mp_context
        self.consumed = 0
        self.stats = PrefetchStats()
        self._ring = PinnedRing(self.device) if self.device.type == "cuda" else None
        from storage.device_gather import DeviceGather, resolve_gather

        self.gather = resolve_gather(gather, self.dataset, self.device, self.num_workers, producer)
        self._gatherer = DeviceGather(self.dataset, self.device, self._ring.stream if self._ring else None,
                                      device_transforms) if self.gather == "device" else None
        self._batch_bytes = 0

    # ------------------------------------------------------------------ the training loop's API

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)
        self.consumed = 0

    def state_dict(self) -> dict:
        """The position of the training loop in the epoch: save it with the checkpoint."""
        if self.dataset is None:
            raise ConfigError("state_dict needs a StreamingDataset source")
        return self.dataset.state_dict(batches=self.consumed, num_workers=max(1, self.num_workers))

    def load_state_dict(self, state: dict) -> None:
        if self.dataset is None:
            raise ConfigError("load_state_dict needs a StreamingDataset source")
        self.dataset.load_state_dict(state)
        self.consumed = int(state["batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.producer == "process":
            yield from self._iter_process()
            return
        queue = GrowableQueue(self.depth)
        source, start = self._open_source()
        self.consumed = start
        self.stats = PrefetchStats(depth=self.depth, shard_depth=self.shard_depth)
        counters = self.dataset.counters() if self.dataset is not None else None
        base = counters.total() if counters is not None else None
        producer = threading.Thread(target=self._produce, args=(source, queue), name="swarm-prefetch", daemon=True)
        producer.start()
        began = time.perf_counter()
        window_start, window_stall = began, 0.0
        try:
            while True:
                item, stall = queue.take()
                if item is None:
                    break
                batch = self._ring.hand_over(item) if self._ring is not None else item
                self._record(stall, batch, counters, base)
                window_stall += stall
                if self.stall_target is not None and self.stats.steps % self.window == 0:
                    now = time.perf_counter()
                    self._tune(window_stall / max(now - window_start, 1e-9), queue)
                    window_start, window_stall = now, 0.0
                self.stats.elapsed_s = time.perf_counter() - began
                self.consumed += 1
                yield batch
        finally:
            self.stats.elapsed_s = time.perf_counter() - began
            queue.stop()
            producer.join(timeout=30)
            if self.stats.steps:
                self._record(0.0, {}, counters, base, final=True)

    def _iter_process(self) -> Iterator[dict[str, Any]]:
        from storage.feed import ProcessFeed

        start = self.dataset.resume_offset(1)
        self.dataset.forget_resume()
        self.consumed = start
        slots = self.depth + 4  # queued, copying, being filled
        self.stats = PrefetchStats(depth=slots, shard_depth=self.shard_depth)
        self.dataset.shard_depth = self.shard_depth
        counters = self.dataset.counters()
        base = counters.total()
        began = time.perf_counter()
        try:
            self._feed = ProcessFeed(self.dataset, self.device, slots)
            for batch, stall in self._feed.batches(start, self.depth):
                self._record(stall, batch, counters, base)
                self.stats.elapsed_s = time.perf_counter() - began
                self.consumed += 1
                yield batch
        finally:
            self.stats.elapsed_s = time.perf_counter() - began
            if self.stats.steps:
                self._record(0.0, {}, counters, base, final=True)

    # ------------------------------------------------------------------ internals

    def _open_source(self):
        if self.dataset is None:
            return iter(self.source), 0
        if self._gatherer is not None:
            self.dataset.shard_depth = self.shard_depth
            start = self.dataset.resume_offset(1)
            self.dataset.forget_resume()
            return self._gatherer.batches(start, fetch_depth=lambda: self.shard_depth), start
        if self.num_workers == 0:
            self.dataset.shard_depth = self.shard_depth
            out = self._ring.provider(self.dataset) if self._ring is not None else None
            start = self.dataset.resume_offset(1)
            return self.dataset.batches(out=out, fetch_depth=lambda: self.shard_depth), start
        from torch.utils.data import DataLoader

        start = self.dataset.resume_offset(self.num_workers)
        self.dataset.shard_depth = self.shard_depth
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=max(2, self.depth), multiprocessing_context=self.mp_context)
        source = iter(loader)  # the workers start here, with the resume point in their copy
        self.dataset.forget_resume()
        return source, start

    def _produce(self, source, queue: GrowableQueue) -> None:
        try:
            for batch in source:
                item = self._ring.to_device(batch) if self._ring is not None and self._gatherer is None else batch
                if not queue.put(item):
                    break
            else:
                if self.dataset is not None and self.num_workers == 0:
                    self.dataset.preload(self.dataset.epoch + 1)  # the usual next epoch
                queue.put(END)
        except BaseException as exc:  # handed to the consumer, raised there
            queue.put(exc)
        finally:
            close = getattr(source, "close", None) or getattr(source, "_shutdown_workers", None)
            if close is not None:
                close()

    def _record(self, stall: float, batch: dict, counters, base, final: bool = False) -> None:
        stats = self.stats
        if not final:
            stats.steps += 1
            stats.stall_s += stall
            stats.step_stall_s.append(stall)
            first = next(iter(batch.values()), None)
            stats.samples += int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 0
            if stats.steps == 1:
                self._batch_bytes = sum(v.numel() * v.element_size() for v in batch.values() if hasattr(v, "numel"))
        else:
            stats.ring_bytes = (self._ring.nbytes if self._ring is not None else 0) + (
                self._gatherer.host_bytes if self._gatherer is not None else 0)
        if counters is not None and (final or stats.steps % 8 == 1):  # sampled: cheap, not free
            now = counters.total()
            reads = (now["hits"] - base["hits"]) + (now["misses"] - base["misses"])
            stats.hit_rate = (now["hits"] - base["hits"]) / reads if reads else stats.hit_rate
            stats.bytes_in_flight = now["bytes_in_flight"]
            stats.flight_samples += 1
            stats.bytes_in_flight_mean += (now["bytes_in_flight"] - stats.bytes_in_flight_mean) / stats.flight_samples
            stats.bytes_fetched = now["bytes_fetched"] - base["bytes_fetched"]

    def _tune(self, share: float, queue: GrowableQueue) -> None:
        if share > self.stall_target:
            room = self._device_room()
            self.stats.memory_capped = self.stats.memory_capped or not room
            if self.depth < self.max_depth and room:
                self.depth += 1
                queue.grow(self.depth)
            if self.shard_depth and self.shard_depth < MAX_DEPTH:
                self.shard_depth += 1
        self.stats.depth, self.stats.shard_depth = self.depth, self.shard_depth
        self.stats.tuning.append((self.stats.steps, self.depth, self.shard_depth, round(share, 4)))


    def _device_room(self) -> bool:
        """Whether one more batch waiting on the device fits (always, off CUDA)."""
        if self.device.type != "cuda":
            return True
        import torch

        from storage.device_gather import fits_on_device

        return fits_on_device(self._batch_bytes, torch.cuda.mem_get_info(self.device)[0], share=0.1)


def _device(device):
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use device=None (CPU)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; allowed: cpu, cuda[:N]")
    return dev

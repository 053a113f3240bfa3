"""Batches made by a forked producer process into a shared host ring.

``Prefetcher(ds, device="cuda", producer="process")`` reads and gathers each epoch's
batches in a child process instead of a thread of the training process. The child
writes each batch's numeric columns straight into a slot of a ring of shared memory
(registered with CUDA as pinned memory, so copies to the device are asynchronous) and
sends the slot's number down a pipe. A copier thread of the training process copies the
slot to the device on a side stream, hands the slot back once that copy has completed,
and queues the batch. Other columns (strings, transformed columns, sample ids) travel
encoded (raw numpy bytes, Arrow IPC; never pickle) with the slot number.

Why a process: a producer *thread* holds the training process's GIL while it plans and
gathers a batch, and a step that waits for the device (``loss.item()``) then also waits
for the GIL; the copier holds it only to issue a copy. Whether that pays depends on the
host: see BENCHMARKS.md (loader section) for the H200 figures. With few cores (2) the
process is slower: there the cores, not the GIL, are the bound.

Without CUDA each batch is copied out of its slot, so the consumer may keep it; that is
correct but costs a copy per batch (use it to test the pipeline, not for speed).

The child starts at the beginning of each iteration (``fork``: the dataset, its plan and
counters are inherited) and ends with the epoch; if the training process dies, the child
notices within a second and exits. An error in the child is raised in the training
process; a child that dies is reported with its exit status.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import json
import select
import signal
import struct
import threading
import time
from collections import deque
from typing import Any, Iterator

import numpy as np
import torch

from storage.errors import SourceError
from storage.handoff import END, GrowableQueue

_HEADER = struct.Struct("<iiI")  # slot (-1: end, -2: failed), rows, encoded extras' length
_SLOT = struct.Struct("<i")
_LAST, _FAILED = -1, -2  # slot numbers that say the epoch ended, or failed
_ALIGN = 64


class _Stop(Exception):
    """The training process closed the pipe: stop producing."""


class _Layout:
    """Where each ring-held column sits in a slot."""

    def __init__(self, specs, batch_size: int):
        self.columns: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
        offset = 0
        for spec in specs:
            self.columns.append((spec.name, spec.dtype, spec.shape, offset))
            offset += -(-spec.row_bytes * batch_size // _ALIGN) * _ALIGN
        self.slot_bytes = max(offset, _ALIGN)

    def views(self, ring: mmap.mmap, slot: int, rows: int) -> dict[str, np.ndarray]:
        base = slot * self.slot_bytes
        return {name: np.frombuffer(ring, dtype=dtype, count=rows * int(np.prod(shape, dtype=np.int64)),
                                    offset=base + offset).reshape(rows, *shape)
                for name, dtype, shape, offset in self.columns}


class ProcessFeed:
    """One epoch of a dataset's batches from a child process, as ``(batch, stall_s)``."""

    def __init__(self, dataset, device, slots: int):
        self.dataset, self.device = dataset, device
        self.slots = max(2, int(slots))
        specs = [s for s in dataset.specs if s.numeric and s.name not in dataset.transforms]
        self.layout = _Layout(specs, dataset.base_spec.batch_size)
        self.cuda = device is not None and device.type == "cuda"
        self.pid: int | None = None  # the producer of the running epoch

    def batches(self, start: int, depth: int) -> Iterator[tuple[dict[str, Any], float]]:
        """The epoch's batches from rank batch ``start`` on, with the consumer's wait for each.

        A copier thread of this process takes each slot the producer fills, copies it (to
        the device on a side stream, or out of the ring on a CPU), hands the slot back once
        the copy is done and queues the batch; at most ``depth`` batches wait.
        """
        ring = mmap.mmap(-1, self.slots * self.layout.slot_bytes)
        r_ready, w_ready = os.pipe()
        r_free, w_free = os.pipe()
        parent = os.getpid()
        pid = self.pid = os.fork()
        if pid == 0:  # the producer: never returns
            os.close(r_ready)
            os.close(w_free)
            _produce(self.dataset, start, ring, self.layout, r_free, w_ready, parent)
        os.close(w_ready)
        os.close(r_free)
        registered = self._register(ring) if self.cuda else None
        queue = GrowableQueue(max(1, depth))
        copier = threading.Thread(target=self._copy, args=(ring, r_ready, w_free, pid, queue),
                                  name="swarm-feed", daemon=True)
        try:
            for slot in range(self.slots):
                _give(w_free, slot)
            copier.start()
            current = torch.cuda.current_stream(self.device) if self.cuda else None
            while True:
                item, stall = queue.take()
                if item is None:
                    return
                batch, event = item
                if event is not None:
                    current.wait_event(event)
                    for value in batch.values():
                        if isinstance(value, torch.Tensor):
                            value.record_stream(current)
                yield batch, stall
        finally:
            queue.stop()  # a copier waiting for room stops
            os.close(w_free)  # the producer reads EOF and stops; the copier then reads EOF
            _reap(pid)
            if copier.is_alive():
                copier.join(timeout=30)
            os.close(r_ready)
            if registered is not None:
                torch.cuda.synchronize(self.device)  # no copy may still read the ring
                torch.cuda.cudart().cudaHostUnregister(registered)

    # ------------------------------------------------------------------ training process

    def _register(self, ring: mmap.mmap) -> int | None:
        address = ctypes.addressof(ctypes.c_char.from_buffer(ring))
        error = torch.cuda.cudart().cudaHostRegister(address, len(ring), 0)
        return address if int(error) == 0 else None  # unregistered, copies are synchronous but right

    def _copy(self, ring, r_ready: int, w_free: int, pid: int, queue) -> None:
        stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        copying: deque[tuple[int, Any]] = deque()  # (slot, event) until the slot's copy has completed
        try:
            while True:
                slot, rows, extras = _read_message(r_ready, pid)
                if slot == _LAST:
                    queue.put(END)
                    return
                if slot == _FAILED:
                    queue.put(extras)
                    return
                host = self.layout.views(ring, slot, rows)
                if not self.cuda:  # the consumer may keep its batch: copied out, the slot goes back
                    arrays = {**{name: view.copy() for name, view in host.items()}, **extras}
                    _give(w_free, slot)
                    item = (self.dataset.finish(arrays), None)
                else:
                    batch = self.dataset.finish({**host, **extras})
                    with torch.cuda.stream(stream):
                        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                 for k, v in batch.items()}
                        event = torch.cuda.Event()
                        event.record(stream)
                    copying.append((slot, event))
                    while copying and (copying[0][1].query() or len(copying) >= self.slots - 1):
                        done, copied = copying.popleft()
                        copied.synchronize()
                        _give(w_free, done)
                    item = (batch, event)
                if not queue.put(item):
                    return
        except BaseException as exc:  # raised in the consumer
            queue.put(exc)


def _give(w_free: int, slot: int) -> None:
    """Hand a slot back to the producer (gone once it has made the epoch's last batch)."""
    try:
        os.write(w_free, _SLOT.pack(slot))
    except BrokenPipeError:
        pass


def _read_exact(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_message(fd: int, pid: int) -> tuple[int, int, Any]:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        status = _reap(pid)
        raise SourceError(f"the loader's producer process (pid {pid}) ended without finishing the epoch "
                          f"({_describe(status)})")
    slot, rows, size = _HEADER.unpack(header)
    payload = _read_exact(fd, size) if size else b""
    if payload is None:
        raise SourceError(f"the loader's producer process (pid {pid}) ended in the middle of a batch")
    if slot == _FAILED:
        return slot, rows, SourceError(payload.decode("utf-8", "replace"))
    return slot, rows, _decode(payload) if payload else {}


def _encode(extras: dict[str, Any]) -> bytes:
    """Columns that are not in the ring: numpy arrays as raw bytes, Arrow arrays as IPC (no pickle)."""
    import pyarrow as pa

    meta, blobs = [], []
    for name, value in extras.items():
        if isinstance(value, np.ndarray):
            data = np.ascontiguousarray(value).tobytes()
            meta.append({"name": name, "kind": "numpy", "dtype": value.dtype.str, "shape": list(value.shape),
                         "size": len(data)})
        else:
            sink = pa.BufferOutputStream()
            array = pa.array(value) if not isinstance(value, (pa.Array, pa.ChunkedArray)) else value
            batch = pa.record_batch([pa.concat_arrays(array.chunks) if isinstance(array, pa.ChunkedArray)
                                     else array], names=["v"])
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            data = sink.getvalue().to_pybytes()
            meta.append({"name": name, "kind": "arrow", "size": len(data)})
        blobs.append(data)
    head = json.dumps(meta).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def _decode(payload: bytes) -> dict[str, Any]:
    import pyarrow as pa

    (size,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + size])
    out, at = {}, 4 + size
    for item in meta:
        data = payload[at: at + item["size"]]
        at += item["size"]
        if item["kind"] == "numpy":
            out[item["name"]] = np.frombuffer(data, dtype=np.dtype(item["dtype"])).reshape(item["shape"]).copy()
        else:
            out[item["name"]] = pa.ipc.open_stream(data).read_next_batch().column(0)
    return out


def _reap(pid: int, timeout: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.005)


def _describe(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


# ---------------------------------------------------------------------- producer process


def _produce(dataset, start: int, ring, layout: _Layout, r_free: int, w_ready: int, parent: int) -> None:
    status = 0
    try:
        dataset._preloaded = {}  # the parent's read-ahead futures have no threads here
        current: dict[str, Any] = {}

        def out(rows: int) -> dict[str, np.ndarray]:
            while not select.select([r_free], [], [], 1.0)[0]:
                if os.getppid() != parent:  # the training process is gone
                    raise _Stop
            data = os.read(r_free, _SLOT.size)
            if len(data) < _SLOT.size:
                raise _Stop
            current["slot"], current["rows"] = _SLOT.unpack(data)[0], rows
            current["views"] = layout.views(ring, current["slot"], rows)
            return dict(current["views"])

        for arrays in dataset.numpy_batches(start, 0, 1, out=out):
            views = current.pop("views")
            extras = {k: v for k, v in arrays.items() if views.get(k) is not v}
            payload = _encode(extras) if extras else b""
            _write_all(w_ready, _HEADER.pack(current["slot"], current["rows"], len(payload)) + payload)
        _write_all(w_ready, _HEADER.pack(_LAST, 0, 0))
    except (_Stop, BrokenPipeError):
        pass
    except BaseException as exc:  # raised in the training process
        payload = f"the loader's producer process failed: {type(exc).__name__}: {exc}".encode()
        try:
            _write_all(w_ready, _HEADER.pack(_FAILED, 0, len(payload)) + payload)
        except OSError:
            status = 1
    finally:
        os._exit(status)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

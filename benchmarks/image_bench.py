"""Image benchmark: JPEG files through our loader vs a torch DataLoader, and decoded at staging.

    python benchmarks/image_bench.py                      # ~2 minutes on 2 cores
    python benchmarks/image_bench.py --images 500         # a quicker, noisier look

Writes ``--images`` synthetic ``--source-size`` square JPEGs (smooth colour fields with
noise, quality 90: ~30 KB each, like small photos) in two class folders of a temporary
directory, stages them with the product's own plan/write/commit (``stage_here``) twice —
kept encoded, and decoded once at staging (``--decode --size``) — and measures images/s
of the training split's default transforms (resize the shorter side to size/0.875, random
``--size`` crop, random flip, normalise; float32 CHW batches of ``--batch-size``):

* **dataloader**: the peer, a torch ``DataLoader`` (``shuffle=True``, ``--workers`` worker
  processes, persistent) over a map-style dataset of the same files, each sample read and
  transformed with the same Pillow calls as ours (``storage.images.open_image``,
  ``resize_crop``), then collated;
* **ours (threads)**: ``StreamingDataset`` of the encoded dataset through ``Prefetcher``
  (``num_workers=0``), the batch decoded on ``--workers`` threads: what ``swarm train`` runs;
* **ours (workers)**: the same through ``Prefetcher(num_workers=--workers)``, one decode
  thread in each ``DataLoader`` worker process: the same parallelism as the peer's;
* **decoded at staging**: the ``--decode`` dataset through ``Prefetcher`` (flip, normalise).

Each figure is the best of ``--repeats`` epochs after one warm-up epoch (files and shards
in the page cache). The load average is recorded: on a shared machine other work moves
the figures. The last printed line is one JSON object (``jpeg_loader_vs_dataloader`` is
ours (threads) over the peer; the warm/cold runtime keys belong to another benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.images import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, open_image, resize_crop, resize_for  # noqa: E402


def write_jpegs(root: Path, count: int, side: int) -> int:
    """``count`` JPEGs in ``root/a`` and ``root/b``; their total bytes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        pixels = np.clip(np.asarray(field).astype(np.int16) + rng.integers(-12, 12, (side, side, 3)), 0, 255)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


class FilesDataset:
    """The peer's map-style dataset: one file read and transformed per sample, as torchvision does."""

    def __init__(self, paths: list[str], labels: list[int], size: int):
        self.paths, self.labels, self.size, self.resize = paths, labels, size, resize_for(size)
        self.mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.inv = 1.0 / (np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1) * 255.0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        with open(self.paths[i], "rb") as f:
            data = f.read()
        at, flip = tuple(np.random.random(2)), bool(np.random.random() < 0.5)
        hwc = resize_crop(open_image(data, self.resize), self.resize, self.size, at, flip)
        chw = np.empty((3, self.size, self.size), dtype=np.float32)  # normalised as ours does it
        np.subtract(hwc.transpose(2, 0, 1), self.mean, out=chw, casting="unsafe")
        chw *= self.inv
        return torch.from_numpy(chw), self.labels[i]


def timed_epochs(make_iter, repeats: int, count_of) -> tuple[float, list[float]]:
    """Images/s of the best of ``repeats`` epochs after a warm-up one."""
    rates = []
    for epoch in range(repeats + 1):
        started, n = time.perf_counter(), 0
        for batch in make_iter(epoch):
            n += count_of(batch)
        if epoch:
            rates.append(n / (time.perf_counter() - started))
    return max(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from storage.loader import StreamingDataset
    from storage.prefetch import Prefetcher
    from tasks.staging import StageConfig, stage_here

    work = Path(args.dir or tempfile.mkdtemp(prefix="image-bench-"))
    load = [os.getloadavg()[0]]
    try:
        started = time.perf_counter()
        file_bytes = write_jpegs(work / "jpegs", args.images, args.source_size)
        print(f"wrote {args.images} JPEGs ({file_bytes / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
        staged = {}
        for name, extra in (("encoded", {"image_size": args.size}), ("decoded", {"decode": args.size})):
            result = stage_here(StageConfig(source=str(work / "jpegs"), dest=str(work / name), **extra))
            staged[name] = result
            print(f"staged {name}: {result.rows} rows, {result.bytes_out / 1e6:.1f} MB in shards "
                  f"({result.bytes_out / file_bytes:.3f} of the files), {result.seconds:.1f} s "
                  f"({result.rows / result.seconds:.0f} images/s)")

        from storage.image_sources import detect

        listing = detect(str(work / "jpegs"), "images")
        peer = FilesDataset(listing.paths, listing.labels, args.size)
        loader = DataLoader(peer, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            persistent_workers=args.workers > 0, drop_last=False)
        figures: dict[str, float] = {}
        figures["dataloader"], _ = timed_epochs(lambda e: loader, args.repeats, lambda b: len(b[1]))
        del loader

        def ours(dataset: str, num_workers: int, threads: int | None):
            ds = StreamingDataset(str(work / dataset), split="train", batch_size=args.batch_size, seed=0,
                                  columns=["image", "label"],
                                  transforms={"image": ImageTransform.from_metadata(
                                      staged_meta[dataset], train=True, threads=threads)})
            pre = Prefetcher(ds, depth=2, num_workers=num_workers)

            def epoch(e: int):
                pre.set_epoch(e)
                return pre
            return timed_epochs(epoch, args.repeats, lambda b: len(b["label"]))[0]

        from storage.dataset import Dataset

        staged_meta = {n: Dataset.open(str(work / n)).manifest.metadata["image"] for n in staged}
        figures["ours_threads"] = ours("encoded", 0, args.workers)
        figures["ours_workers"] = ours("encoded", args.workers, None)
        figures["decoded_at_staging"] = ours("decoded", 0, args.workers)
        load.append(os.getloadavg()[0])
        print(f"\nimages/s, {args.images} JPEGs {args.source_size}x{args.source_size} -> {args.size}, "
              f"batch {args.batch_size}, {args.workers} workers, torch {torch.__version__}, "
              f"load average {load[0]:.2f} -> {load[1]:.2f} (shared machine)")
        for key, value in figures.items():
            print(f"  {key:<22} {value:10.0f}  x{value / figures['dataloader']:.2f}")
        summary = {
            "images": args.images, "source_size": args.source_size, "size": args.size,
            "batch_size": args.batch_size, "workers": args.workers, "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in load],
            "shard_bytes_over_file_bytes": round(staged["encoded"].bytes_out / file_bytes, 4),
            "stage_encoded_images_per_s": round(staged["encoded"].rows / staged["encoded"].seconds, 1),
            "stage_decoded_images_per_s": round(staged["decoded"].rows / staged["decoded"].seconds, 1),
            **{f"{k}_images_per_s": round(v, 1) for k, v in figures.items()},
            "jpeg_loader_vs_dataloader": round(figures["ours_threads"] / figures["dataloader"], 3),
            "jpeg_loader_workers_vs_dataloader": round(figures["ours_workers"] / figures["dataloader"], 3),
            "decoded_at_staging_vs_dataloader": round(figures["decoded_at_staging"] / figures["dataloader"], 3),
            "warm_runtime_train_s": None, "cold_runtime_train_s": None,
        }
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

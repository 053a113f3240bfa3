"""Image bytes: checking, decoding and the loader's per-split transforms.

    transform = ImageTransform(size=224, train=True)        # resize, random crop, random flip, normalise
    batch = transform(binary_column)                        # float32 (B, 3, 224, 224)

Staging keeps JPEG/PNG/WebP files as their encoded bytes (:mod:`storage.image_sources`);
the loader decodes each batch's column with one of these transforms, as torchvision's
``ImageFolder`` with ``transforms.v2`` would per sample: the training split gets a resize
of the shorter side to ``resize`` (``size / 0.875``, as 256 is to 224), a random
``size`` x ``size`` crop and a random horizontal flip; other splits a centre crop; both
are normalised with ``mean``/``std`` (ImageNet's by default) into float32 CHW. A dataset
decoded once at staging (``--decode SIZE``) holds uint8 CHW pixels already cropped: its
training transform only flips, then normalises.

**Decoder: Pillow** (13, with libjpeg-turbo 3; WebP and PNG by libwebp and zlib), for all
three formats. ``benchmarks/jpeg_decoders.py`` (one thread, best of interleaved rounds of 100
synthetic photo-like JPEGs, shared 2-core machine, three runs) against simplejpeg 1.9
(libjpeg-turbo straight into NumPy): 256x256 in 0.57-1.11 ms with Pillow, 0.26-0.49 ms with
simplejpeg; 512x512 decoded at half scale (Pillow's ``draft`` mode, simplejpeg's
``min_width``: DCT-domain downscaling) 1.05-2.20 / 0.89-1.62 ms. simplejpeg decodes JPEG
about 1.2-2x faster, but is JPEG-only (resize and crop would stay Pillow's) and is not in
the environment this was built in (which may not be changed): a JPEG fast path through it
is left for later. Both refuse
truncated files, which staging relies on. pillow-simd (faster resizing) would replace
Pillow in the environment, and ``torchvision.io.decode_jpeg`` needs a torchvision built
against our exact torch 2.13 CPU wheel (not installed; its JPEG path is libjpeg-turbo too).

Pillow releases the GIL while decoding and resizing, so a batch is decoded on a thread pool
of ``threads`` (default: the CPUs available, one inside a ``DataLoader`` worker process);
each image is cropped, flipped and normalised there too, straight into the batch.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # the crop's share of the resized shorter side (224 of 256)


class BadImage(ValueError):
    """Bytes that are not a whole JPEG, PNG or WebP image."""


def resize_for(size: int) -> int:
    """The shorter side images are resized to before a ``size`` crop."""
    return max(size, round(size / CROP_RATIO))


def open_image(data: bytes, min_side: int | None = None):
    """A decoded RGB Pillow image; JPEGs decoded straight to at least ``min_side`` (draft mode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in IMAGE_FORMATS:
            raise BadImage(f"a {img.format} image; allowed: JPEG, PNG, WebP")
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))  # scales 1/2..1/8 keep both sides >= min_side
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a JPEG, PNG or WebP image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImage(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__) from None


def check_image(data: bytes) -> None:
    """Raise :class:`BadImage` unless ``data`` decodes whole (JPEGs at 1/8 scale: every
    byte of the entropy-coded data is still read, so truncation is found, at a fraction of the cost)."""
    open_image(data, min_side=1)


def resize_crop(img, resize: int, size: int, at: tuple[float, float] | None = None, flip: bool = False) -> np.ndarray:
    """Resize the shorter side to ``resize``, crop ``size`` x ``size`` (centre, or at the
    fractions ``at`` of the slack), flip left-right if asked: HWC uint8."""
    from PIL import Image

    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    fx, fy = at if at is not None else (0.5, 0.5)
    left, top = int(fx * (nw - size)), int(fy * (nh - size))
    img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def decode_to(data: bytes, size: int) -> np.ndarray:
    """One image as staging's ``--decode SIZE`` stores it: centre crop, CHW uint8."""
    return np.ascontiguousarray(resize_crop(open_image(data, size), size, size).transpose(2, 0, 1))


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def default_threads() -> int:
    """Decode threads: one in a ``DataLoader`` worker process (the workers are the parallelism), else the CPUs."""
    from torch.utils.data import get_worker_info

    return 1 if get_worker_info() is not None else cpu_count()


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def thread_map(fn, items: list, threads: int) -> list:
    """``[fn(x) for x in items]`` on this process's pool of ``threads`` (created after a fork)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    key = (os.getpid(), threads)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="swarm-decode")
    return list(pool.map(fn, items, chunksize=max(1, len(items) // (4 * threads))))


@dataclass
class ImageTransform:
    """A batch's image column (encoded bytes, or staged uint8 CHW pixels) as float32 CHW.

    Picklable, so it travels to ``DataLoader`` workers and Dask workers; the random crop
    and flip of the training split come from ``seed`` and a per-call counter.
    """

    size: int
    train: bool = False
    resize: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    seed: int = 0
    threads: int | None = None
    _calls: int = field(default=0, repr=False)

    @classmethod
    def from_metadata(cls, image: dict[str, Any], train: bool, seed: int = 0, threads: int | None = None):
        """The transform a dataset's manifest ``image`` record asks for."""
        return cls(int(image["size"]), train, int(image.get("resize") or resize_for(int(image["size"]))),
                   tuple(image.get("mean") or IMAGENET_MEAN), tuple(image.get("std") or IMAGENET_STD), seed, threads)

    def __call__(self, column) -> np.ndarray:
        rng = np.random.default_rng([self.seed, os.getpid() if self.train else 0, self._calls])
        self._calls += 1
        threads = self.threads if self.threads is not None else default_threads()
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        inv = 1.0 / (np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1) * 255.0)

        def normalise(target: np.ndarray, chw: np.ndarray) -> None:  # uint8 CHW -> float32, in place
            np.subtract(chw, mean, out=target, casting="unsafe")
            target *= inv

        if isinstance(column, (pa.Array, pa.ChunkedArray)):
            return self._decode(column, rng, threads, normalise)
        pixels = np.asarray(column)  # staged: (B, 3, S, S) uint8
        flips = rng.random(len(pixels)) < 0.5 if self.train else np.zeros(len(pixels), dtype=bool)
        out = np.empty(pixels.shape, dtype=np.float32)

        def rows(lo: int) -> None:
            hi = min(len(pixels), lo + 16)
            normalise(out[lo:hi], pixels[lo:hi])
            for i in np.flatnonzero(flips[lo:hi]) + lo:
                out[i] = out[i][..., ::-1]

        thread_map(rows, list(range(0, len(pixels), 16)), threads)
        return out

    def _decode(self, column, rng: np.random.Generator, threads: int, normalise) -> np.ndarray:
        """Each image decoded, cropped, flipped and normalised on the pool, straight into the batch."""
        items = column.to_pylist()
        size, resize = self.size, self.resize or resize_for(self.size)
        n = len(items)
        at = rng.random((n, 2)) if self.train else np.full((n, 2), 0.5)
        flips = rng.random(n) < 0.5 if self.train else np.zeros(n, dtype=bool)
        out = np.empty((n, 3, size, size), dtype=np.float32)

        def one(i: int) -> None:
            if items[i] is None:
                raise BadImage(f"row {i} of the batch has no image")
            hwc = resize_crop(open_image(items[i], resize), resize, size, tuple(at[i]), bool(flips[i]))
            normalise(out[i], hwc.transpose(2, 0, 1))

        thread_map(one, list(range(n)), threads)
        return out

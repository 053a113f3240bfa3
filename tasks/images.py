"""Staging of image files, the driver's and workers' hooks: :mod:`tasks.staging` calls these.

Plan: :func:`inspect` lists the images (:mod:`storage.image_sources`) and cuts them into
units; the manifest's metadata records ``kind: "images"``, the classes (sorted, as
``ImageFolder``), ``feature``/``label``, the ``shape`` the loader yields (3, size, size),
and ``image`` (``stored``: encoded or decoded, ``size``, ``resize``, ``mean``, ``std``),
from which training builds the per-split transforms (:mod:`storage.images`) and the
built-in CNN takes its input shape and class count. Write: rows whose image does not
decode are dropped (:func:`drop_bad`) and counted by path. Commit: :func:`check_bad` fails
the staging naming the bad files (the shards written for it are removed, no manifest is
written) unless ``skip_bad``, which records how many were left out.

Shards keep the files' bytes in a binary column under the configured codec: zstd's default
level costs ~3 ms per MB of JPEG to write, finds the entropy-coded data incompressible
(stored as is: reading it back is a copy) and still saves ~2 % on the files' repeated
headers, so shards are no bigger than the files (``none`` would add Arrow's offsets).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from storage import image_sources
from storage.cleanup import remove_unreferenced
from storage.errors import SourceError
from storage.image_sources import IMAGE_COLUMN, IMAGES, LABEL_COLUMN, PATH_COLUMN
from storage.images import IMAGENET_MEAN, IMAGENET_STD, resize_for

SHOW_BAD = 10  # bad files named in an error or the manifest


class ImageOptions(BaseModel):
    """How image files are staged (used where the source is images)."""

    decode: int | None = Field(
        None, ge=4, le=4096,
        description="Images: decode once at staging to SIZE x SIZE RGB pixels (shorter side resized, centre crop) "
        "instead of keeping the encoded files",
    )
    image_size: int = Field(
        224, ge=4, le=4096,
        description="Images kept encoded: the side of the square the loader's transforms crop (after resizing "
        "the shorter side to size/0.875)",
    )
    skip_bad: bool = Field(False, description="Images: leave out files that do not decode (counted) instead of failing")


def inspect(config: Any, unit_bytes: int):
    """``(schema, units, rows, bytes_in, metadata, fingerprint)`` of an image source, or None
    where the source is not images."""
    fmt = getattr(config, "format", "auto")
    listing = image_sources.detect(config.source, fmt, getattr(config, "storage_options", None))
    if listing is None:
        return None
    decode = getattr(config, "decode", None)
    size = decode or getattr(config, "image_size", 224)
    image = {"stored": "decoded" if decode else "encoded", "size": size,
             "resize": size if decode else resize_for(size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    metadata = {"kind": IMAGES, "feature": IMAGE_COLUMN, "label": LABEL_COLUMN, "path": PATH_COLUMN,
                "classes": listing.classes, "num_classes": len(listing.classes), "shape": [3, size, size],
                "image": image}
    listing = listing.shuffled(getattr(config, "seed", 0))
    units = image_sources.units(listing, unit_bytes, decode)
    fp = listing.fingerprint({"decode": decode, "image_size": size, "skip_bad": getattr(config, "skip_bad", False)})
    return image_sources.schema(decode), units, len(listing.paths), sum(listing.sizes), metadata, fp


def is_images(units) -> bool:
    return bool(units) and units[0].format == IMAGES


def drop_bad(table: pa.Table, mask: np.ndarray) -> tuple[pa.Table, np.ndarray, list[str]]:
    """The rows whose image decoded (and their split mask), and the paths of those that did not."""
    valid = table.column(IMAGE_COLUMN).is_valid()
    if pc.all(valid).as_py():
        return table, mask, []
    bad = table.filter(pc.invert(valid)).column(PATH_COLUMN).to_pylist()
    keep = valid.to_numpy(zero_copy_only=False)
    return table.filter(valid), mask[keep], bad


def check_bad(plan, bad: list[str], fs, root: str) -> dict[str, Any]:
    """Fail on bad images (after removing the shards written for them) unless skipping; the metadata to record."""
    if not bad:
        return plan.metadata
    listed = ", ".join(repr(b) for b in sorted(bad)[:SHOW_BAD]) + (", …" if len(bad) > SHOW_BAD else "")
    if not plan.config.skip_bad:
        _remove_written(fs, root, plan.previous)
        raise SourceError(f"{len(bad)} image(s) in {plan.config.source!r} do not decode (truncated or not "
                          f"JPEG/PNG/WebP): {listed}; fix or remove them, or pass --skip-bad to stage without them")
    return {**plan.metadata, "skipped_bad": {"count": len(bad), "paths": sorted(bad)[:SHOW_BAD]}}


def _remove_written(fs, root: str, previous) -> None:
    """Leave the destination as it was: the previous dataset's shards, or nothing at all."""
    remove_unreferenced(fs, root, keep=[previous])
    try:
        if previous is None and fs.exists(root) and not fs.find(root):
            fs.rm(root, recursive=True)  # only empty split folders are left
    except (FileNotFoundError, OSError):
        pass


def summary(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What the CLI and artifacts show of an image dataset."""
    if metadata.get("kind") != IMAGES:
        return None
    return {"classes": metadata["classes"], "stored": metadata["image"]["stored"], "size": metadata["image"]["size"],
            "skipped_bad": (metadata.get("skipped_bad") or {}).get("count", 0)}

"""Image folders the tests write: two classes of PNG and JPEG files told apart by colour."""

from __future__ import annotations

import io

import numpy as np

COLOURS = {"cat": (210, 40, 40), "dog": (40, 40, 210)}


def _image_bytes(rng, colour, fmt: str, shape=(24, 32)) -> bytes:
    from PIL import Image

    pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (*shape, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def write_image_folder(write, per_class: int = 16, broken: bool = True) -> dict[str, bytes]:
    """``ROOT/cat``, ``ROOT/dog``: PNG and JPEG files by turns (and a truncated JPEG), through ``write(rel, data)``."""
    rng = np.random.default_rng(0)
    files = {}
    for name, colour in COLOURS.items():
        for i in range(per_class):
            fmt = "PNG" if i % 2 else "JPEG"
            files[f"{name}/{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}"] = _image_bytes(rng, colour, fmt)
    if broken:
        whole = files["cat/000.jpg"]
        files["cat/broken.jpg"] = whole[: len(whole) // 2]
    for rel, data in files.items():
        write(rel, data)
    return files


def local_writer(root):
    def write(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return write

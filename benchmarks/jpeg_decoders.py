"""JPEG decoders side by side: Pillow (ours) and simplejpeg, one thread, the figures in storage/images.py.

    python3 -m venv /tmp/jpeg-venv && /tmp/jpeg-venv/bin/pip install pillow==13.0.0 simplejpeg numpy
    /tmp/jpeg-venv/bin/python benchmarks/jpeg_decoders.py

Needs neither torch nor the project (simplejpeg is a peer only). 100 synthetic photo-like JPEGs
(quality 90) of each size; best of ``--rounds`` interleaved rounds; the last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np


def photos(side: int, count: int, rng) -> list[bytes]:
    from PIL import Image

    out = []
    for _ in range(count):
        field = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        pixels = np.clip(np.asarray(field).astype(np.int16) + rng.integers(-12, 12, (side, side, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    import simplejpeg
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--target", type=int, default=256, help="the side DCT-scaled decodes keep at least")
    args = parser.parse_args()

    def pillow(data: bytes, side: int | None):
        img = Image.open(io.BytesIO(data))
        if side:
            img.draft("RGB", (side, side))
        img.load()
        return img

    def sj(data: bytes, side: int | None):
        extra = {"min_height": side, "min_width": side} if side else {}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **extra)

    rng = np.random.default_rng(0)
    results = {}
    for side in (256, 512):
        files = photos(side, 100, rng)
        cases = {f"{name}_{side}_{'scaled' if scaled else 'full'}": (fn, args.target if scaled else None)
                 for name, fn in (("pillow", pillow), ("simplejpeg", sj)) for scaled in (False, side > args.target)}
        best = {k: float("inf") for k in cases}
        for _ in range(args.rounds):
            for key, (fn, target) in cases.items():
                started = time.perf_counter()
                for data in files:
                    fn(data, target)
                best[key] = min(best[key], (time.perf_counter() - started) / len(files) * 1e3)
        results.update({f"{k}_ms": round(v, 3) for k, v in best.items()})
    for key, value in results.items():
        print(f"{key:<32} {value:.3f} ms/image")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

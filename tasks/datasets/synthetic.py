"""Deterministic synthetic datasets of any size, for tests and benchmarks.

Rows are generated in fixed blocks seeded by ``(seed, block)``, so any row range reads
the same values whatever the chunking, and labels are learnable: each class has its own
image template or its own marker tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from storage.sources import SHAPE_KEY
from tasks.datasets.params import check_params, int_param

BLOCK = 1024
MAX_ROWS = 10**10


def _blocks(start: int, stop: int, make) -> list:
    parts = []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else start // BLOCK):
        lo, hi = block * BLOCK, (block + 1) * BLOCK
        arrays = make(block)
        a, b = max(start, lo) - lo, min(stop, hi) - lo
        parts.append([x[a:b] for x in arrays])
    return parts


class SyntheticImages:
    """``synthetic-image?rows=10000&size=32&channels=3&classes=10&seed=0`` (uint8 images)."""

    name = "synthetic-image"
    PARAMS = ("rows", "size", "channels", "classes", "seed")

    def __init__(self, **params):
        check_params(self.name, params, self.PARAMS)
        self.rows = int_param(self.name, "rows", params.get("rows", 10_000), 1, MAX_ROWS)
        self.size = int_param(self.name, "size", params.get("size", 32), 1, 1024)
        self.channels = int_param(self.name, "channels", params.get("channels", 3), 1, 16)
        self.classes = int_param(self.name, "classes", params.get("classes", 10), 2, 1000)
        self.seed = int_param(self.name, "seed", params.get("seed", 0), 0, 2**31)
        self.shape = (self.channels, self.size, self.size)
        self.width = int(np.prod(self.shape))
        self.metadata = {
            "kind": "image",
            "feature": "image",
            "label": "label",
            "shape": list(self.shape),
            "num_classes": self.classes,
            "scale": 1 / 255,
        }
        rng = np.random.default_rng([self.seed, 2**32 - 1])
        self._templates = rng.integers(40, 216, size=(self.classes, self.width)).astype(np.int16)

    def schema(self) -> pa.Schema:
        meta = {SHAPE_KEY: json.dumps(list(self.shape)).encode()}
        return pa.schema([pa.field("image", pa.list_(pa.uint8(), self.width), metadata=meta), pa.field("label", pa.int64())])

    def num_rows(self) -> int:
        return self.rows

    def _block(self, block: int):
        rng = np.random.default_rng([self.seed, block])
        n = min(BLOCK, self.rows - block * BLOCK)
        labels = rng.integers(0, self.classes, size=n)
        noise = rng.integers(-40, 40, size=(n, self.width), dtype=np.int16)
        images = np.clip(self._templates[labels] + noise, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    def read(self, start: int, stop: int) -> pa.Table:
        parts = _blocks(start, min(stop, self.rows), self._block)
        images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, self.width), np.uint8)
        labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        col = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), self.width)
        return pa.Table.from_arrays([col, pa.array(labels)], schema=self.schema())


class SyntheticTokens:
    """``synthetic-tokens?rows=10000&seq_len=64&vocab=1024&classes=4&seed=0`` (int32 tokens)."""

    name = "synthetic-tokens"
    PARAMS = ("rows", "seq_len", "vocab", "classes", "seed")

    def __init__(self, **params):
        check_params(self.name, params, self.PARAMS)
        self.rows = int_param(self.name, "rows", params.get("rows", 10_000), 1, MAX_ROWS)
        self.seq_len = int_param(self.name, "seq_len", params.get("seq_len", 64), 4, 65_536)
        self.vocab = int_param(self.name, "vocab", params.get("vocab", 1024), 16, 2**31 - 1)
        self.classes = int_param(self.name, "classes", params.get("classes", 4), 2, 1000)
        self.seed = int_param(self.name, "seed", params.get("seed", 0), 0, 2**31)
        self.metadata = {
            "kind": "tokens",
            "feature": "tokens",
            "label": "label",
            "seq_len": self.seq_len,
            "vocab_size": self.vocab,
            "num_classes": self.classes,
        }

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("tokens", pa.list_(pa.int32(), self.seq_len)), pa.field("label", pa.int64())])

    def num_rows(self) -> int:
        return self.rows

    def _block(self, block: int):
        rng = np.random.default_rng([self.seed, block])
        n = min(BLOCK, self.rows - block * BLOCK)
        labels = rng.integers(0, self.classes, size=n)
        # Zipf-distributed background tokens, with class marker tokens sprinkled in.
        tokens = np.minimum(rng.zipf(1.3, size=(n, self.seq_len)), self.vocab - 1).astype(np.int32)
        markers = rng.random((n, self.seq_len)) < 0.15
        marker_ids = (self.vocab - 1 - labels * 3 - rng.integers(0, 3, size=(n, self.seq_len)).T).T
        tokens = np.where(markers, marker_ids, tokens).astype(np.int32)
        return tokens, labels.astype(np.int64)

    def read(self, start: int, stop: int) -> pa.Table:
        parts = _blocks(start, min(stop, self.rows), self._block)
        tokens = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, self.seq_len), np.int32)
        labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        col = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), self.seq_len)
        return pa.Table.from_arrays([col, pa.array(labels)], schema=self.schema())

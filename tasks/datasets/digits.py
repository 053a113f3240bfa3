"""scikit-learn's handwritten digits: 1,797 real 8x8 images in 10 classes."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pyarrow as pa

from storage.sources import SHAPE_KEY
from tasks.datasets.params import check_params

SHAPE = (1, 8, 8)


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.data / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
    return images, bunch.target.astype(np.int64)


class Digits:
    name = "digits"
    metadata = {"kind": "image", "feature": "image", "label": "label", "shape": list(SHAPE), "num_classes": 10}

    def __init__(self, **params):
        check_params("digits", params, ())

    def schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field("image", pa.list_(pa.float32(), 64), metadata={SHAPE_KEY: json.dumps(list(SHAPE)).encode()}),
                pa.field("label", pa.int64()),
            ]
        )

    def num_rows(self) -> int:
        return len(_arrays()[1])

    def read(self, start: int, stop: int) -> pa.Table:
        images, labels = _arrays()
        flat = pa.array(images[start:stop].reshape(-1))
        return pa.Table.from_arrays(
            [pa.FixedSizeListArray.from_arrays(flat, 64), pa.array(labels[start:stop])], schema=self.schema()
        )

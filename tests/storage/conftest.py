"""Small staged datasets shared by the cache, loader and prefetch tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from storage.dataset import Dataset
from tasks.datasets import open_builtin
from tasks.staging import StageConfig, stage_here

IMAGES = "synthetic-image?rows=3000&size=4"


def stage(source: str, dest: str, **options):
    return stage_here(StageConfig(source=source, dest=dest, **options))


@dataclass
class Staged:
    url: str
    dataset: Dataset
    table: pa.Table  # every source row, in order

    def rows(self, split: str) -> pa.Table:
        """The split's rows in manifest order: sample id i is row i."""
        return self.dataset.read_table(split)

    def images(self, split: str) -> np.ndarray:
        col = self.rows(split).column("image").combine_chunks()
        return col.values.to_numpy().reshape(len(col), 3, 4, 4)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Staged:
    """3,000 4x4 RGB images with labels in ~20 shards, a tenth held out as 'val'."""
    dest = str(tmp_path_factory.mktemp("images") / "ds")
    stage(IMAGES, dest, shard_size="8KB", val_fraction=0.1)
    return Staged(dest, Dataset.open(dest), open_builtin(IMAGES).read(0, 3000))


@pytest.fixture
def cache_opts(tmp_path) -> dict:
    return {"cache_dir": str(tmp_path / "cache"), "cache_bytes": "64MB"}

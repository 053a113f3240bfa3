"""The train/val split of a staged row: a pure function of its global index, the seed and the fraction."""

from __future__ import annotations

import numpy as np


def split_mask(rows: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True where a global row index falls in the 'val' split (splitmix64 of seed and index)."""
    if fraction <= 0:
        return np.zeros(len(rows), dtype=bool)
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction

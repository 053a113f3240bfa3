"""Shard layout: where shards start, and where write tasks may be cut, from source units.

A unit (a Parquet row group, a slice of a NumPy file, a whole CSV file) is the smallest
piece of a source that can be read, so a write task that needs any row of a unit decodes
all of it. Cutting shards at a fixed row count ignores that: every task boundary then
falls inside a unit, which both neighbouring tasks decode (with units about as large as
shards, nearly every unit is decoded twice). So shards follow units instead:

* consecutive units smaller than the target are packed whole into one shard;
* a unit larger than the target is split into ``round(bytes / target)`` (at least one)
  equal shards;

and tasks are cut at unit boundaries wherever one lies near the even split. Both are
pure functions of the units and the target, never of the cluster size, so a re-run
reproduces the same shards.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

from storage.sources import SourceUnit


def shard_bounds(units: Sequence[SourceUnit], target_bytes: int) -> list[int]:
    """Row offsets where shards start, followed by the total row count."""
    bounds = [0]
    offset = 0
    packed = 0  # bytes in the open shard of whole small units
    for unit in units:
        size = max(1, unit.raw_bytes)
        if packed and packed + size > target_bytes:
            bounds.append(offset)
            packed = 0
        if size > target_bytes and unit.rows > 1:
            pieces = min(unit.rows, max(1, round(size / target_bytes)))
            bounds.extend(offset + unit.rows * k // pieces for k in range(1, pieces))
            bounds.append(offset + unit.rows)
        elif unit.rows:
            packed += size
        offset += unit.rows
    if bounds[-1] != offset:
        bounds.append(offset)
    return bounds


def group_cuts(bounds: Sequence[int], aligned: set[int], n_groups: int) -> list[int]:
    """Shard indices where write tasks start (0 first), at most ``n_groups`` of them.

    Each cut is the shard boundary nearest the even split by rows, preferring one that is
    also a unit boundary (``aligned``) unless that would move it by more than half a task.
    """
    shards, total = len(bounds) - 1, bounds[-1]
    n_groups = max(1, min(n_groups, shards))
    inner = bounds[1:-1]
    preferred = [i + 1 for i, row in enumerate(inner) if row in aligned]
    cuts = [0]
    for j in range(1, n_groups):
        ideal = total * j / n_groups
        choice = _nearest(bounds, range(1, shards), ideal)
        if preferred:
            best = _nearest(bounds, preferred, ideal)
            if abs(bounds[best] - ideal) <= total / n_groups / 2:
                choice = best
        if choice > cuts[-1]:
            cuts.append(choice)
    return cuts


def _nearest(bounds: Sequence[int], candidates: Sequence[int], ideal: float) -> int:
    """The candidate shard index whose start row is closest to ``ideal``."""
    rows = [bounds[c] for c in candidates]
    i = bisect_left(rows, ideal)
    near = [k for k in (i - 1, i) if 0 <= k < len(candidates)]
    return candidates[min(near, key=lambda k: abs(rows[k] - ideal))]

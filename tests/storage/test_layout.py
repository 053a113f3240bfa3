"""Shard layout: shards follow source units, tasks are cut where no unit is shared."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings, strategies as st

from storage import sources
from storage.layout import group_cuts, shard_bounds
from storage.sources import SourceUnit
from tasks.staging import StageConfig, group_tasks, plan_stage


def units_of(*sizes: tuple[int, int]) -> list[SourceUnit]:
    """Units from ``(rows, bytes)`` pairs."""
    return [SourceUnit(f"file://u{i}", "parquet", 0, 1, rows, raw) for i, (rows, raw) in enumerate(sizes)]


def test_small_units_are_packed_whole_and_large_ones_split_evenly():
    # 3 small units pack into shards of at most 100 bytes; the 400-byte unit becomes 4 shards.
    units = units_of((10, 40), (10, 40), (10, 40), (100, 400), (5, 20))
    assert shard_bounds(units, 100) == [0, 20, 30, 55, 80, 105, 130, 135]


def test_unit_slightly_over_the_target_stays_whole():
    assert shard_bounds(units_of((30, 130), (30, 130)), 100) == [0, 30, 60]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5000)), min_size=1, max_size=30),
    target=st.integers(1, 3000),
    n_groups=st.integers(1, 9),
)
def test_layout_invariants(sizes, target, n_groups):
    units = units_of(*sizes)
    total = sum(rows for rows, _ in sizes)
    bounds = shard_bounds(units, target)
    assert bounds[0] == 0 and bounds[-1] == total
    assert all(a < b for a, b in zip(bounds, bounds[1:])) or total == 0
    starts = {0}
    for rows, _ in sizes:
        starts.add(max(starts) + rows)
    for a, b in zip(bounds, bounds[1:]):
        inside = [s for s in starts if a < s < b]
        # a shard is either whole units (packed) or a piece of one unit: never pieces of two
        assert not inside or (a in starts and b in starts)
    if total:
        cuts = group_cuts(bounds, starts, n_groups)
        assert cuts[0] == 0 and len(cuts) <= n_groups
        assert all(a < b for a, b in zip(cuts, cuts[1:])) and cuts[-1] < len(bounds) - 1


def test_tasks_are_cut_at_unit_boundaries_so_each_unit_is_read_once(tmp_path):
    table = pa.table({"x": pa.array(np.arange(4000, dtype=np.int64))})
    for i in range(4):
        pq.write_table(table.slice(i * 1000, 1000), tmp_path / f"part{i}.parquet")
    # 8,000 decoded bytes per file, 3,000 per shard: files are never shared by two tasks
    plan = plan_stage(StageConfig(source=str(tmp_path), dest=str(tmp_path / "out"), shard_size=3000))
    for n_groups in (2, 4):
        groups = group_tasks(plan, n_groups)
        assert len(groups) == n_groups
        read = [unit.url for g in groups for _, unit in g.units]
        assert sorted(read) == sorted(set(read)) and len(read) == 4


def test_parquet_units_count_decoded_bytes(tmp_path):
    # Dictionary-encoded token ids: Parquet's pages are a fraction of the decoded size.
    tokens = np.random.default_rng(0).integers(0, 50, size=(2000, 64), dtype=np.int32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), 64)
    pq.write_table(pa.table({"tokens": column, "label": pa.array(np.arange(2000))}), tmp_path / "t.parquet",
                   row_group_size=500)
    inspected = sources.inspect(sources.list_files(str(tmp_path / "t.parquet"))[0], 1 << 20)
    assert [u.raw_bytes for u in inspected.units] == [500 * (64 * 4 + 8)] * 4
    assert pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0).total_byte_size < 500 * 64 * 4 / 2

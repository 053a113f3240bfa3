"""Tables with the types real data carries, for round-trip tests."""

from __future__ import annotations

import datetime as dt
import decimal

import pyarrow as pa


def rich_table(rows: int = 50) -> pa.Table:
    def maybe(i, value):
        return None if i % 7 == 3 else value

    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "text": pa.array([maybe(i, f"größe-{i}-日本語-🙂") for i in range(rows)], pa.string()),
            "blob": pa.array([maybe(i, bytes([i % 256, 0, 255]) * (i % 4)) for i in range(rows)], pa.binary()),
            "score": pa.array([maybe(i, i / 3) for i in range(rows)], pa.float64()),
            "tags": pa.array([maybe(i, [f"t{j}" for j in range(i % 4)]) for i in range(rows)], pa.list_(pa.string())),
            "vec": pa.array([[float(i), -float(i), 0.5] for i in range(rows)], pa.list_(pa.float32(), 3)),
            "point": pa.array(
                [maybe(i, {"x": i, "y": f"y{i}"}) for i in range(rows)],
                pa.struct([("x", pa.int32()), ("y", pa.string())]),
            ),
            "category": pa.array([["red", "green", "blue"][i % 3] for i in range(rows)]).dictionary_encode(),
            "when": pa.array(
                [maybe(i, dt.datetime(2024, 1, 1, tzinfo=tz) + dt.timedelta(minutes=i)) for i in range(rows)],
                pa.timestamp("us", tz="Asia/Kolkata"),
            ),
            "price": pa.array([maybe(i, decimal.Decimal(f"{i}.{i % 100:02d}")) for i in range(rows)], pa.decimal128(12, 2)),
            "flag": pa.array([maybe(i, i % 2 == 0) for i in range(rows)], pa.bool_()),
        }
    )

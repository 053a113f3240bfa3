"""Tables written the way users write them (one column per feature, a label), from data that ships
with scikit-learn: wine with string labels, a categorical column and nulls; diabetes as a regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

CELLARS = ("north", "south", "east")


def wine_table() -> pa.Table:
    """scikit-learn's wine: 13 numeric features, string labels, a categorical column ``cellar``
    and nulls in ``ash`` (every 9th row)."""
    from sklearn.datasets import load_wine

    data = load_wine()
    columns: dict[str, pa.Array] = {
        name.replace("/", "_"): pa.array(data.data[:, i]) for i, name in enumerate(data.feature_names)}
    columns["ash"] = pa.array([None if i % 9 == 0 else float(v) for i, v in enumerate(data.data[:, 2])], pa.float64())
    columns["cellar"] = pa.array([CELLARS[i % 3] for i in range(len(data.target))])
    columns["label"] = pa.array([str(data.target_names[t]) for t in data.target])
    return pa.table(columns)


def diabetes_table() -> pa.Table:
    """scikit-learn's diabetes (unscaled): 10 numeric features and a float ``target``."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    columns = {name: pa.array(data.data[:, i]) for i, name in enumerate(data.feature_names)}
    columns["target"] = pa.array(data.target.astype(np.float64))
    return pa.table(columns)


def write(table: pa.Table, path: Path, fmt: str) -> str:
    """``table`` as a CSV or Parquet file at ``path`` (suffix added); its URL."""
    out = path.with_suffix(f".{fmt}")
    if fmt == "csv":
        pa_csv.write_csv(table, out)
    else:
        pq.write_table(table, out)
    return str(out)


def breast_cancer_table() -> pa.Table:
    """scikit-learn's breast cancer: 30 numeric features and 2 classes (integer labels 0/1)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    columns = {name.replace(" ", "_"): pa.array(data.data[:, i]) for i, name in enumerate(data.feature_names)}
    columns["label"] = pa.array(data.target.astype(np.int64))
    return pa.table(columns)

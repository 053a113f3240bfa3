"""Table columns as model input and labels as targets, encoded from the manifest's statistics.

A :class:`FeatureEncoding` turns the chosen feature columns of a batch (numpy arrays, or
Arrow arrays for strings and nullable numbers) into one float32 matrix, vectorised per
column — no per-row Python:

* a numeric column is standardised with the train split's mean and standard deviation
  (``normalize="standard"``; a constant column is only centred) or taken as it is
  (``"none"``); a null or NaN becomes the train mean (0 after standardising);
* a categorical column (strings, dictionaries) becomes one-hot over the train split's
  vocabulary; a null or a value the vocabulary lacks is all zeros.

A :class:`LabelEncoding` maps labels to class ids over the train split's sorted classes
(strings or integers: ``classes`` are the names predictions come back as), or, for
regression, standardises a float target (predictions are turned back into its units).
Both are JSON (:meth:`to_json`), recorded in every checkpoint, so training, inference,
optimisation and serving encode alike. Written here because the encodings must be the
ones recorded at staging, merged over workers; scikit-learn's and Ray's preprocessors
fit themselves on one table in one process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import ConfigError
from tasks.tables.stats import as_floats, as_strings

#: The batch key of the assembled feature matrix (not a dataset column).
FEATURES = "features"


@dataclass(frozen=True)
class FeatureColumn:
    name: str
    kind: str  # numeric | categorical
    mean: float = 0.0
    std: float = 1.0
    vocabulary: tuple = ()
    nullable: bool = False  # read as Arrow: nulls present in some split

    @property
    def width(self) -> int:
        return len(self.vocabulary) if self.kind == "categorical" else 1


@dataclass(frozen=True)
class FeatureEncoding:
    columns: tuple[FeatureColumn, ...]
    normalize: str = "standard"

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def arrow_columns(self) -> set[str]:
        """Columns the loader keeps as Arrow arrays (strings, and numbers with nulls)."""
        return {c.name for c in self.columns if c.kind == "categorical" or c.nullable}

    def encode(self, arrays: dict[str, Any]) -> np.ndarray:
        """``{column: numpy or Arrow array}`` of one batch as the ``(rows, width)`` float32 model input."""
        first = arrays[self.columns[0].name]
        rows = len(first)
        out = np.zeros((rows, self.width), dtype=np.float32)
        at = 0
        for col in self.columns:
            values = arrays[col.name]
            if col.kind == "numeric":
                out[:, at] = self._numeric(col, values)
            else:
                codes = _codes(as_strings(_array(values)), pa.array(col.vocabulary, pa.string()))
                hit = codes >= 0
                out[np.flatnonzero(hit), at + codes[hit]] = 1.0
            at += col.width
        return out

    def _numeric(self, col: FeatureColumn, values) -> np.ndarray:
        if isinstance(values, np.ndarray):
            x = values.astype(np.float64)
        else:
            x = as_floats(_array(values)).to_numpy(zero_copy_only=False)
        x = np.where(np.isnan(x), col.mean, x)  # the null rule: the train mean
        if self.normalize == "standard":
            x = (x - col.mean) / (col.std if col.std > 0 else 1.0)
        return x

    def encode_table(self, table: pa.Table) -> np.ndarray:
        return self.encode({c.name: table.column(c.name).combine_chunks() for c in self.columns})

    def encode_rows(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Rows given as objects of named features (online serving); a missing feature is null."""
        missing = sorted({n for r in rows for n in self.names if n not in r})
        if len(missing) == len(self.names):
            raise ConfigError(f"no row names any feature of this model; features: {', '.join(self.names)}")
        arrays = {}
        for col in self.columns:
            values = [r.get(col.name) for r in rows]
            try:
                arrays[col.name] = (pa.array([None if v is None else str(v) for v in values], pa.string())
                                    if col.kind == "categorical" else pa.array(values, pa.float64()))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ConfigError(f"feature {col.name!r} must be a number in every row; got "
                                  f"{next(v for v in values if not isinstance(v, (int, float, type(None))))!r}") from None
        return self.encode(arrays)

    def to_json(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "FeatureEncoding":
        return cls(tuple(FeatureColumn(**{**c, "vocabulary": tuple(c.get("vocabulary") or ())})
                         for c in doc["columns"]), doc.get("normalize", "standard"))


@dataclass(frozen=True)
class LabelEncoding:
    column: str
    task: str  # classify | regression
    classes: tuple = ()  # classify: the names (strings or integers) of class ids 0..n-1
    mean: float = 0.0  # regression: the train target's moments
    std: float = 1.0

    @property
    def identity(self) -> bool:
        """Class ids that are the labels themselves (0..n-1): nothing to encode."""
        return self.task == "classify" and self.classes == tuple(range(len(self.classes)))

    @property
    def named(self) -> bool:
        return any(isinstance(c, str) for c in self.classes)

    def encode(self, values) -> np.ndarray:
        """A batch of labels as class ids (int64) or standardised targets (float32)."""
        arr = _array(values)
        if self.task == "regression":
            x = as_floats(arr).to_numpy(zero_copy_only=False)
            if np.isnan(x).any():
                raise ConfigError(f"label column {self.column!r} holds nulls or NaN; a regression target needs a number "
                                  "in every row")
            return ((x - self.mean) / (self.std or 1.0)).astype(np.float32)
        if self.named:
            codes = _codes(as_strings(arr), pa.array(self.classes, pa.string()))
        else:
            codes = _codes(arr.cast(pa.int64()), pa.array(self.classes, pa.int64()))
        if (codes < 0).any():
            bad = arr[int(np.flatnonzero(codes < 0)[0])].as_py()
            shown = ", ".join(map(str, self.classes[:20])) + (" ..." if len(self.classes) > 20 else "")
            raise ConfigError(f"label {bad!r} of column {self.column!r} is not one of the model's "
                              f"{len(self.classes)} classes ({shown})")
        return codes.astype(np.int64)

    def decode(self, outputs: np.ndarray) -> list:
        """Model outputs as the user's values: class names for class ids, targets in their units."""
        if self.task == "regression":
            return (np.asarray(outputs, dtype=np.float64) * (self.std or 1.0) + self.mean).tolist()
        return [self.classes[int(i)] for i in outputs] if self.classes else np.asarray(outputs).tolist()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> "LabelEncoding | None":
        return None if not doc else cls(**{**doc, "classes": tuple(doc.get("classes") or ())})


def _array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, np.ndarray):
        return pa.array(values)
    if hasattr(values, "numpy"):  # a tensor
        return pa.array(values.numpy())
    return values


def _codes(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Each value's index in ``value_set``, -1 for a null or an unknown value."""
    index = pc.index_in(values, value_set=value_set)
    return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

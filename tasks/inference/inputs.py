"""Request rows: what a model takes, checked before anything is queued.

A row is the model's input as the dataset stored it: the feature column's values, flat
(``width`` numbers, e.g. 64 for 8x8 digits) or nested in the feature's shape
(``[[[...8 values] x 8]]`` for ``[1, 8, 8]``). A model trained on table columns takes a
row as an object of named features (``{"alcohol": 13.2, "color": "red", ...}``; a missing
one is null) or as the features' values in the order it was trained with, and encodes it
with the standardisation and vocabularies its checkpoint records; it answers class names
(or a regression's values in the target's units). Rows become float32, or int64 token ids for
token models (the transformer), whatever the JSON numbers look like, so a row gives the
same tensor whichever requests share its batch. Scaling recorded at training time
(``scale`` in the checkpoint's columns) is applied exactly as in training, through
:func:`tasks.training.data.feature_tensor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import ConfigError, SwarmError
from tasks.inference.predict import softmax
from tasks.training.data import Columns, feature_tensor


class PayloadError(SwarmError):
    """A request body the server cannot use; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    columns: Columns
    shape: tuple[int, ...]  # one row's shape
    tokens: bool = False  # integer token ids (else float features)

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_checkpoint(cls, name: str, args: dict[str, Any], columns: dict[str, Any]) -> "InputSpec":
        """From a loaded model's ``name``, ``args`` and ``columns`` (see ``LoadedModel``)."""
        shape = columns.get("shape")
        if not shape:
            shape = _shape_from_args(name, args)
        if not shape:
            raise ConfigError(
                f"the checkpoint of model {name!r} does not record its input shape (columns: {columns or 'none'}); "
                "train it with Swarm, which records the dataset's feature shape"
            )
        cols = Columns.from_record({**columns, "shape": shape, "label": columns.get("label") or "label"})
        return cls(cols, tuple(int(d) for d in shape), tokens=name == "transformer")

    def parse(self, inputs: Any, max_rows: int) -> np.ndarray:
        """``inputs`` from a request as an array of ``(rows, width)``; :class:`PayloadError` otherwise."""
        example = f"[[{self.width} numbers], ...]"
        if not isinstance(inputs, list) or not inputs:
            raise PayloadError(f'"inputs" must be a non-empty list of rows, like {example}; got {_kind(inputs)}')
        if len(inputs) > max_rows:
            raise PayloadError(f'"inputs" has {len(inputs)} rows; at most {max_rows} per request', status=413)
        if self.columns.table is not None:
            return self._parse_named(inputs)
        try:
            rows = np.asarray(inputs)
        except (ValueError, TypeError, OverflowError):
            raise PayloadError(f'the rows of "inputs" are ragged or not numbers; each row must be {self._layout()}') from None
        if rows.dtype.kind not in "iuf":
            raise PayloadError(f'"inputs" must hold numbers only (got {_dtype_name(rows)}); each row is {self._layout()}')
        if rows.shape[1:] not in ((self.width,), self.shape):
            got = "a single row (wrap it in a list)" if rows.ndim == 1 else f"rows of shape {list(rows.shape[1:])}"
            raise PayloadError(f'each row of "inputs" must be {self._layout()}; got {got}')
        rows = rows.reshape(len(rows), self.width)
        if self.tokens:
            if rows.dtype.kind == "f":
                raise PayloadError('"inputs" of this model are integer token ids; got numbers with a fraction or exponent')
            return rows.astype(np.int64, copy=False)
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
            rows = rows.astype(np.float32)
        if not np.isfinite(rows).all():
            raise PayloadError('"inputs" holds NaN or infinite values (or values too large for float32)')
        return rows

    def _parse_named(self, inputs: list) -> np.ndarray:
        """Table rows: objects of named features, or the features' values in training's order."""
        table = self.columns.table
        names = table.names
        rows = []
        for row in inputs:
            if isinstance(row, list) and len(row) == len(names):
                row = dict(zip(names, row))
            if not isinstance(row, dict):
                raise PayloadError(f'each row of "inputs" must be an object of named features ({", ".join(names)}) '
                                   f"or a list of their {len(names)} values in that order; got {_kind(row)}")
            rows.append(row)
        try:
            return table.encode_rows(rows)
        except ConfigError as exc:
            raise PayloadError(str(exc)) from None

    def describe(self) -> dict[str, Any]:
        """What ``GET /health`` says a row is."""
        doc: dict[str, Any] = {"width": self.width, "shape": list(self.shape), "scale": self.columns.scale}
        if self.columns.table is not None:
            doc["features"] = self.columns.table.names
        labels = self.columns.labels
        if labels is not None and labels.task == "regression":
            doc["task"] = "regression"
        elif labels is not None and labels.named:
            doc["classes"] = list(labels.classes)
        return doc

    def answer(self, outputs: np.ndarray, probabilities: bool) -> dict[str, Any]:
        """The response's predictions for the model's outputs: class ids, or the class names the
        labels had, or a regression's values in the target's units (and the softmax if asked)."""
        labels = self.columns.labels
        if labels is not None and labels.task == "regression":
            return {"predictions": labels.decode(outputs.reshape(len(outputs), -1)[:, 0])}
        ids = outputs.argmax(axis=-1)
        doc: dict[str, Any] = {"predictions": labels.decode(ids) if labels is not None and labels.named else ids}
        if probabilities:
            doc["probabilities"] = softmax(outputs)
        if labels is not None and labels.named:
            doc["classes"] = list(labels.classes)
        return doc

    def _layout(self) -> str:
        flat = f"{self.width} {'token ids' if self.tokens else 'numbers'}"
        return flat if len(self.shape) == 1 else f"{flat} (flat, or nested as shape {list(self.shape)})"

    def to_tensor(self, rows: np.ndarray):
        """The model input for ``rows`` of :meth:`parse`, exactly as training built it."""
        return feature_tensor(rows, self.columns)


def _shape_from_args(name: str, args: dict[str, Any]) -> list[int] | None:
    if name == "mlp" and "in_features" in args:
        return [int(args["in_features"])]
    if name == "cnn":
        size = int(args.get("image_size", 8))
        return [int(args.get("in_channels", 1)), size, size]
    if name == "transformer":
        return [int(args.get("seq_len", 64))]
    return None


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list"
    return "null" if value is None else type(value).__name__


def _dtype_name(rows: np.ndarray) -> str:
    return {"b": "true/false", "U": "strings", "O": "nulls, objects or mixed values"}.get(rows.dtype.kind, str(rows.dtype))

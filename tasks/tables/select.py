"""Which columns are a model's features and label, and how they are encoded, from the manifest.

``--feature-columns`` takes names or globs (``"mean *"``, ``"x?"``); by default every
numeric or categorical column but the label (string columns with more distinct values than
:data:`~tasks.tables.stats.MAX_CATEGORIES` — ids, free text — are left out; naming one is
an error). The task is the label's: floats are a regression target, integers, strings and
dictionaries are classes (``--task`` may say so, checked). Everything is checked here,
before anything is written, with errors that name the column and what is allowed.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import pyarrow as pa

from storage.errors import ConfigError
from tasks.tables.encoding import FeatureColumn, FeatureEncoding, LabelEncoding
from tasks.tables.stats import MAX_CATEGORIES, column_kind

_RESTAGE = "stage the dataset again with this version (swarm stage) to record its column statistics"


def expand(patterns: list[str], names: list[str], where: str) -> list[str]:
    """The columns ``patterns`` name (globs expanded, in the table's order), each checked."""
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)] if any(ch in pattern for ch in "*?[") \
            else [pattern] if pattern in names else []
        if not hits:
            raise ConfigError(f"feature column {pattern!r} matches no column of {where} (columns: {', '.join(names)})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def feature_encoding(schema: pa.Schema, stats: dict[str, Any] | None, patterns: list[str], label: str | None,
                     normalize: str, where: str) -> FeatureEncoding:
    """The encoding of the chosen (or default) feature columns of a staged table."""
    if stats is None:
        raise ConfigError(f"{where} records no column statistics (staged by an older version); {_RESTAGE}")
    names = [n for n in schema.names if n != label]
    explicit = bool(patterns)
    chosen = expand(patterns, schema.names, where) if explicit else names
    if label in chosen:
        raise ConfigError(f"column {label!r} is the label; it cannot be a feature column too")
    columns = []
    for name in chosen:
        entry = stats.get(name)
        kind = column_kind(schema.field(name).type)
        if entry is None or kind is None:
            if not explicit:
                continue
            raise ConfigError(f"feature column {name!r} of {where} is {schema.field(name).type}; a feature column "
                              "holds numbers, booleans or strings (a fixed-size list is a model input on its own: "
                              "give it as the only feature column)")
        if entry["kind"] == "string":
            if not explicit:
                continue
            raise ConfigError(f"feature column {name!r} of {where} holds more than {MAX_CATEGORIES} distinct strings, "
                              f"over the cap for categories ({MAX_CATEGORIES}); leave it out of --feature-columns")
        if entry["kind"] == "numeric":
            columns.append(FeatureColumn(name, "numeric", float(entry["mean"]), float(entry["std"]),
                                         nullable=entry["nulls"] > 0))
        else:
            columns.append(FeatureColumn(name, "categorical", vocabulary=tuple(entry["vocabulary"]), nullable=True))
    if not columns:
        raise ConfigError(f"{where} has no numeric or categorical column besides the label {label!r} "
                          f"(columns: {', '.join(schema.names)}); pass --feature-columns")
    return FeatureEncoding(tuple(columns), normalize)


def label_task(schema: pa.Schema, label: str, asked: str, entry: dict[str, Any] | None = None) -> str:
    """``classify`` or ``regression``: the one asked for (checked against the label's type), else
    the label's (floats are targets). An integer label whose distinct values are more than half
    its train rows (a float target written to CSV reads back as integers) is not guessed: the
    error asks for ``--task``."""
    typ = schema.field(label).type
    numeric_float = pa.types.is_floating(typ) or pa.types.is_decimal(typ)
    if asked == "regression":
        if column_kind(typ) != "numeric":
            raise ConfigError(f"--task regression needs a numeric label; column {label!r} is {typ} "
                              "(string labels are classes: use --task classification)")
        return "regression"
    if asked in ("classify", "classification"):
        if numeric_float:
            raise ConfigError(f"label column {label!r} is {typ}; classes need integers or strings "
                              "(a float label is a regression target: --task regression)")
        return "classify"
    if numeric_float:
        return "regression"
    values = (entry or {}).get("values")
    count = (entry or {}).get("count") or 0
    if pa.types.is_integer(typ) and count and (values is None or len(values) > max(20, count // 2)):
        distinct = f"{len(values)}" if values is not None else f"more than {MAX_CATEGORIES}"
        raise ConfigError(f"label column {label!r} holds integers with {distinct} distinct values in {count} train rows: "
                          "a regression target, or classes? Pass --task regression or --task classification")
    return "classify"


def label_encoding(schema: pa.Schema, stats: dict[str, Any] | None, label: str, task: str,
                   where: str) -> LabelEncoding | None:
    """The label's encoding from its statistics (None for a dataset staged without them)."""
    entry = (stats or {}).get(label)
    if entry is None:
        if stats is not None and column_kind(schema.field(label).type) is None:
            raise ConfigError(f"label column {label!r} of {where} is {schema.field(label).type}; a label is a "
                              "number or a string")
        return None
    if task == "regression":
        return LabelEncoding(label, "regression", mean=float(entry["mean"]), std=float(entry["std"]) or 1.0)
    classes = entry.get("vocabulary") if entry["kind"] == "categorical" else entry.get("values")
    if classes is None:
        raise ConfigError(f"label column {label!r} of {where} holds more than {MAX_CATEGORIES} distinct values; "
                          f"classes are capped at {MAX_CATEGORIES}")
    if len(classes) < 2:
        held = f"one class ({classes[0]!r})" if classes else "no labels"
        raise ConfigError(f"label column {label!r} of {where} holds {held} in its train split; a classifier needs "
                          "at least two classes")
    return LabelEncoding(label, "classify", tuple(classes))

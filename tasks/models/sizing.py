"""Models sized from the data: what a dataset says a model must take and give, and the check.

Staging records in the manifest what sizes a model: the input shape (``shape``, or a
table's feature width), the label classes (``classes`` / ``num_classes``) or a float
target (regression: one output), and for tokens ``vocab_size`` and ``seq_len``. Here that
becomes a :class:`DataSize`, and from it

* :func:`model_arguments`: a built-in's arguments (always from the data; an explicit
  ``--model-arg`` still wins, and is then checked), or, for a user factory, the same
  values as keyword arguments where its signature names them (``in_features``,
  ``input_shape``, ``num_classes``, ``num_outputs``, ``in_channels``, ``image_size``,
  ``vocab_size``, ``seq_len``);
* :func:`check_model`: the model run on one batch on the driver before any worker
  starts, so a width or class-count mismatch is one line naming both numbers;
* :func:`shape_record`: the input shape every checkpoint records (a plain fixed-size
  list included), so whatever Swarm trains, Swarm serves.

Image datasets size the CNN the same way: ``shape`` ``[channels, height, width]`` in the
manifest becomes ``in_channels`` and ``image_size``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

from storage.errors import ConfigError

#: The arguments a user factory may take from the data (passed only where its signature names them).
DATA_ARGUMENTS = ("in_features", "input_shape", "num_classes", "num_outputs", "in_channels", "image_size",
                  "vocab_size", "seq_len")


@dataclass(frozen=True)
class DataSize:
    """What the data fixes about a model: its input and its outputs."""

    input_shape: tuple[int, ...] | None  # one row's model input (after any table encoding)
    task: str = "classify"  # classify | regression | causal-lm
    num_classes: int | None = None  # classify: how many classes the labels hold
    vocab_size: int | None = None  # token models
    seq_len: int | None = None

    @property
    def in_features(self) -> int | None:
        return math.prod(self.input_shape) if self.input_shape else None

    @property
    def num_outputs(self) -> int | None:
        """Values the model gives per row: the classes, or one for a regression target."""
        return 1 if self.task == "regression" else self.num_classes

    def values(self) -> dict[str, Any]:
        """Every data argument this size knows, by the name a factory would take it."""
        out: dict[str, Any] = {"in_features": self.in_features,
                               "input_shape": list(self.input_shape) if self.input_shape else None,
                               "num_classes": self.num_outputs if self.task != "causal-lm" else None,
                               "num_outputs": self.num_outputs,
                               "vocab_size": self.vocab_size, "seq_len": self.seq_len}
        shape = self.input_shape or ()
        if len(shape) in (2, 3):
            out["in_channels"] = int(shape[0]) if len(shape) == 3 else 1
            out["image_size"] = int(shape[-1])
        return {k: v for k, v in out.items() if v is not None}


def data_size(metadata: dict[str, Any], input_shape: tuple[int, ...] | None, task: str = "classify",
              num_classes: int | None = None) -> DataSize:
    """The size a dataset's manifest ``metadata`` and the chosen input give a model.

    ``num_classes`` (the label encoding's classes, where the columns resolved them) wins over
    the metadata's ``classes`` / ``num_classes``."""
    if num_classes is None and task == "classify":
        classes = metadata.get("classes")
        num_classes = len(classes) if classes else metadata.get("num_classes")
    vocab, seq_len = metadata.get("vocab_size"), metadata.get("seq_len")
    return DataSize(tuple(int(d) for d in input_shape) if input_shape else None, task,
                    None if num_classes is None else int(num_classes),
                    None if vocab is None else int(vocab), None if seq_len is None else int(seq_len))


#: What each built-in takes from the data.
BUILTIN_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "mlp": ("in_features", "num_classes"),
    "cnn": ("in_channels", "image_size", "num_classes"),
    "transformer": ("vocab_size", "seq_len", "num_classes"),
    "gpt": ("vocab_size", "seq_len"),
}


def model_arguments(name: str, factory: Callable[..., Any] | None, size: DataSize,
                    explicit: dict[str, Any]) -> dict[str, Any]:
    """The model's arguments: the data's (for a built-in always, for a factory where its
    signature names them), then the ``explicit`` ones over them."""
    values = size.values()
    if name in BUILTIN_ARGUMENTS:
        wanted = BUILTIN_ARGUMENTS[name]
    elif factory is not None and not name.startswith("hf:"):
        wanted = _named_parameters(factory)
    else:
        wanted = ()
    return {**{k: values[k] for k in wanted if k in values}, **explicit}


def _named_parameters(factory: Callable[..., Any]) -> tuple[str, ...]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(n for n in DATA_ARGUMENTS if n in params
                 and params[n].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def shape_record(shape: tuple[int, ...] | None, column_type: Any = None) -> list[int] | None:
    """The input shape a checkpoint records: the feature's shape, else a fixed-size list's width."""
    if shape:
        return [int(d) for d in shape]
    size = getattr(column_type, "list_size", None)
    if size is not None:
        return [int(size)]
    return None if column_type is None else [1]


def _expected_width(model) -> int | None:
    """The input width of a model whose first layer is a Linear (None where it is not)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)):
            return None
    return None


def check_model(model, name: str, size: DataSize, x, labels=None, what: str = "the dataset", origin: str = "") -> None:
    """Run ``model`` on one batch ``x`` (a tensor of model input rows) on this machine and
    refuse, in one line naming both numbers, an input width or output count the data does
    not fit, or a label outside the model's classes. ``origin`` says where the model is from."""
    import torch

    width = int(math.prod(x.shape[1:]))
    rows = tuple(int(d) for d in x.shape[1:])
    name = f"{name!r}{origin}"
    expected = _expected_width(model)
    if expected is not None and expected != width and size.task != "causal-lm":
        raise ConfigError(f"model {name} cannot take {what} (rows of {rows} values): the model takes {expected} input "
                          f"values per row, the data has {width}; leave --model-arg in_features out (built-ins take it from the "
                          f"data) or give {width}")
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure here is a model/data mismatch
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"model {name} cannot take {what} (rows of {rows} values): "
                          f"{type(exc).__name__}: {detail}") from None
    outputs = size.num_outputs
    got = int(out.shape[-1]) if getattr(out, "ndim", 0) >= 2 else 1
    if outputs is not None and got != outputs:
        wanted = "1 output (a regression target)" if size.task == "regression" else f"{outputs} classes"
        raise ConfigError(f"model {name} gives {got} outputs per row, but the labels of {what} have {wanted}; "
                          "leave --model-arg num_classes out (built-ins take it from the data) or match it")
    if labels is not None and size.task == "classify" and len(labels):
        high = int(labels.max())
        if high >= got or int(labels.min()) < 0:
            bad = high if high >= got else int(labels.min())
            raise ConfigError(f"label {bad} of {what} is outside the model's {got} classes (0..{got - 1})")

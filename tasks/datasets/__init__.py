"""Built-in datasets: small modules behind a registry, addressed as ``name?key=value&…``.

``digits``            scikit-learn's 1,797 handwritten 8x8 digits (real, ships in the package)
``synthetic-image``   deterministic image-like rows of any size (``synthetic`` for short)
``synthetic-tokens``  deterministic token sequences of any size
``python-help``       Python's help topics, ``python-stdlib`` its standard library's sources (text)

Every built-in reads any row range on its own, so staging tasks generate their slices in
parallel without the driver touching the data.
"""

from __future__ import annotations

from typing import Callable, Protocol
from urllib.parse import parse_qsl

import pyarrow as pa

from storage.errors import ConfigError
from tasks.datasets.params import check_params, int_param  # noqa: F401 - for the built-ins


class BuiltinDataset(Protocol):
    name: str
    metadata: dict

    def schema(self) -> pa.Schema: ...

    def num_rows(self) -> int: ...

    def read(self, start: int, stop: int) -> pa.Table: ...


Factory = Callable[..., BuiltinDataset]
REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory, clobber: bool = False) -> None:
    if name in REGISTRY and not clobber:
        raise ValueError(f"built-in dataset {name!r} is already registered")
    REGISTRY[name] = factory


def split_name(spec: str) -> tuple[str, dict[str, str]]:
    name, _, query = spec.partition("?")
    return name, dict(parse_qsl(query, keep_blank_values=True))


def is_builtin(spec: str) -> bool:
    _load_builtins()
    return "://" not in spec and split_name(spec)[0] in REGISTRY


def open_builtin(spec: str) -> BuiltinDataset:
    """Build a built-in dataset from ``name?key=value&…``, validating every parameter."""
    _load_builtins()
    name, params = split_name(spec)
    factory = REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"unknown built-in dataset {name!r}; built-ins: {', '.join(sorted(REGISTRY))}")
    return factory(**params)


def _load_builtins() -> None:
    if REGISTRY:
        return
    from tasks.datasets import digits, synthetic, text

    register("digits", digits.Digits)
    register("synthetic-image", synthetic.SyntheticImages)
    register("synthetic", synthetic.SyntheticImages)
    register("synthetic-tokens", synthetic.SyntheticTokens)
    register("python-help", text.PythonHelp)
    register("python-stdlib", text.PythonStdlib)

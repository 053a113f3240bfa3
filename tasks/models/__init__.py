"""Models: built-ins (mlp, cnn, transformer, gpt) behind a registry, or a user factory.

A model is named by a spec: a built-in name or ``package.module:factory``, plus keyword
arguments. Checkpoints store the spec, so a model can always be rebuilt exactly. A spec
read from a checkpoint is data, not a choice the user made: loading one imports and calls
a factory outside the built-ins only from a module listed in ``$SWARM_TRUSTED_MODEL_MODULES``
(a checkpoint naming ``os:system`` would otherwise run code, as a pickle would).
Built-in arguments the dataset determines (input size, classes, vocabulary) are filled
in from the manifest by :mod:`tasks.models.sizing`; explicit arguments win.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

from storage.errors import ConfigError

REGISTRY: dict[str, Callable[..., Any]] = {}
TRUSTED_ENV = "SWARM_TRUSTED_MODEL_MODULES"


def register(name: str, factory: Callable[..., Any], clobber: bool = False) -> None:
    if name in REGISTRY and not clobber:
        raise ValueError(f"model {name!r} is already registered")
    REGISTRY[name] = factory


def _load_builtins() -> None:
    if REGISTRY:
        return
    from tasks.models import cnn, gpt, mlp, transformer

    register("mlp", mlp.build)
    register("cnn", cnn.build)
    register("transformer", transformer.build)
    register("gpt", gpt.build)


def builtin_names() -> list[str]:
    _load_builtins()
    return sorted(REGISTRY)


def resolve_factory(name: str, from_checkpoint: bool = False) -> Callable[..., Any]:
    """The callable that builds ``name``: a built-in, or ``module:function`` imported (for a
    spec ``from_checkpoint``, only from a trusted module)."""
    _load_builtins()
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("hf:"):  # a transformers folder: safetensors only, no remote code (see tasks.models.hf)
        from functools import partial

        from tasks.models import hf

        return partial(hf.build, name[len("hf:"):])
    if ":" not in name:
        raise ConfigError(
            f"unknown model {name!r}; built-ins: {', '.join(sorted(REGISTRY))}, a transformers folder as hf:URL, or a factory as MODULE:FUNCTION"
        )
    module_name, _, attr = name.partition(":")
    if from_checkpoint and not _trusted(module_name):
        raise ConfigError(
            f"the checkpoint names model factory {name!r}, which is not a built-in: loading it would import and run "
            f"code from module {module_name!r}. If you trust that module, allow it on every machine that loads "
            f"the model: export {TRUSTED_ENV}={module_name} (comma-separated)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model factory {name!r}: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"model factory {name!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def _trusted(module_name: str) -> bool:
    allowed = [m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip()]
    return any(module_name == m or module_name.startswith(m + ".") for m in allowed)


def build_model(name: str, kwargs: dict[str, Any] | None = None, from_checkpoint: bool = False,
                storage_options: dict | None = None):
    """Instantiate a model from its spec, with a clear error for bad arguments.

    ``storage_options`` reach only an ``hf:`` model's folder reader (they are never part of a spec)."""
    factory = resolve_factory(name, from_checkpoint)
    if name.startswith("hf:") and storage_options:
        kwargs = {**(kwargs or {}), "storage_options": storage_options}
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(f"model {name!r} rejected its arguments {kwargs}: {exc}") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_model(metadata: dict[str, Any], task: str = "classify") -> str:
    if task == "causal-lm" or metadata.get("kind") == "text":
        return "gpt"
    if metadata.get("kind") == "images":  # image files (tasks.images): sized from the manifest's shape
        return "cnn"
    return "transformer" if metadata.get("kind") == "tokens" else "mlp"


def config_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)

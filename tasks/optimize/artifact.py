"""Optimized model artifacts: a folder holding ``tensors.safetensors`` and ``meta.json``.

Written by :func:`storage.checkpoint.write` (tensors first, the JSON last and atomically,
format ``swarm-model``), so a folder without ``meta.json`` is no artifact. The metadata
carries everything needed to rebuild the model:

- ``model``: factory name and arguments *after* structural changes (a structurally
  pruned MLP has its new ``hidden`` widths there), so ``build_model`` gives the right shapes;
- ``optimizations``: the steps applied, in order. Loading re-applies those that change
  modules: ``quantize`` (which layers become :class:`Int8Linear`, in which mode) and
  ``cast`` (the dtype, and the input-casting wrapper). ``merge-lora`` and ``prune`` need
  nothing: their result is in the arguments and the weights;
- ``columns``: the training checkpoint's input/label columns, shape and scale;
- ``source``, ``eval`` and ``report``: where it came from and what it measured.
"""

from __future__ import annotations

import json
from typing import Any

from storage import checkpoint as ckpt
from storage.errors import DestinationError, ManifestError
from storage.urls import url_to_fs
from tasks.models import build_model
from tasks.optimize.precision import CastInputs, dtype_of, unwrap
from tasks.optimize.quantize import Int8Linear, install_int8

STEPS_WITHOUT_MODULES = ("merge-lora", "prune")


def model_tensors(model) -> dict[str, Any]:
    """The stored state of a model, named as in training checkpoints (``model.`` prefix)."""
    return {f"model.{k}": v.detach() for k, v in unwrap(model).state_dict().items()}


def check_output(url: str, storage_options: dict | None = None) -> None:
    """Refuse an output that would overwrite something other than an earlier artifact."""
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    if fs.isfile(path):
        raise DestinationError(f"output {url!r} is a file; give a folder URL for the optimized model")
    meta_path = f"{path}/{ckpt.META}"
    if fs.exists(meta_path):
        try:
            found = json.loads(fs.cat_file(meta_path)).get("format")
        except ValueError:
            found = None
        if found != ckpt.MODEL_FORMAT_ID:
            raise DestinationError(
                f"output {url!r} holds a {found or 'unreadable'!s} folder, not an optimized model; "
                "refusing to overwrite it: give another output folder"
            )
    elif fs.isdir(path) and fs.ls(path, detail=False):
        raise DestinationError(f"output {url!r} is a folder with other files in it; give a new or empty folder")


def save_artifact(url: str, tensors: dict[str, Any], meta: dict[str, Any], storage_options: dict | None = None,
                  files: dict[str, bytes] | None = None) -> str:
    return ckpt.write(url, tensors, meta, storage_options, format_id=ckpt.MODEL_FORMAT_ID, files=files)


def rebuild(name: str, args: dict[str, Any], steps: list[dict[str, Any]]):
    """The artifact's model with the right modules and shapes, weights not yet loaded."""
    model = build_model(name, args, from_checkpoint=True)
    for step in steps:
        kind = step.get("step")
        if kind == "quantize":
            install_int8(model, step["layers"], step["mode"])
        elif kind == "cast":
            model.to(dtype_of(step["dtype"]))
        elif kind not in STEPS_WITHOUT_MODULES:
            raise ManifestError(
                f"the artifact was optimized with step {kind!r}, which this version cannot rebuild "
                f"(known: quantize, cast, {', '.join(STEPS_WITHOUT_MODULES)})"
            )
    return model


def for_inference(model, steps: list[dict[str, Any]]):
    """The loaded model as callers use it: int8 kernels packed up front (no slow first
    request), and a cast model behind a wrapper that feeds it matching inputs."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.prepare()
    for step in steps:
        if step.get("step") == "cast":
            return CastInputs(model, dtype_of(step["dtype"]))
    return model

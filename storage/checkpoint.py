"""Checkpoints: safetensors plus JSON metadata on any fsspec URL. Never pickles.

A checkpoint is a folder ``ckpt-<step>`` under a checkpoint root holding
``tensors.safetensors`` and ``meta.json``. The tensors go first; ``meta.json`` (with the
tensors' hash, and since version 2 a checksum of its own content) is written last and
atomically, so a folder without it is not a checkpoint and is ignored; a kill at any
moment leaves the previous checkpoint usable.
Only the last ``keep_last`` checkpoints are kept.

An optimized model (``swarm-model`` format) is the same kind of folder at a URL of its own:
its metadata says how to rebuild the model and re-apply the optimizations.
"""

from __future__ import annotations

import json
import re
from typing import Any

from storage import atomic
from storage.errors import ConfigError, IntegrityError, ManifestError
from storage.hashing import check_sealed, digest_bytes, sealed_json
from storage.reach import reaching
from storage.urls import url_to_fs

FORMAT_ID = "swarm-checkpoint"
MODEL_FORMAT_ID = "swarm-model"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: meta.json without a checksum
TENSORS = "tensors.safetensors"
META = "meta.json"
_DIR = re.compile(r"^ckpt-(\d{9})$")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _name(step: int) -> str:
    return f"ckpt-{step:09d}"


def unshared(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors safetensors can store, and the aliases left out.

    safetensors refuses tensors that share memory (tied weights: a language model's output
    head is its token embedding). A tensor that *is* an earlier one (same storage, offset,
    shape, strides, dtype) is stored once and recorded as ``alias -> name``; :func:`load`
    puts it back. Any other overlap (a view of part of another tensor) is stored as a copy.
    """
    out: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, value in tensors.items():
        value = value.detach()
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
               value.dtype, value.device)
        if value.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        storage = value.untyped_storage().data_ptr()
        if value.numel() and storage in storages:
            value = value.clone()
        elif value.numel():
            storages.add(storage)
            seen[key] = name
        out[name] = value.contiguous().cpu()
    return out, aliases


def write(url: str, tensors: dict[str, Any], meta: dict[str, Any], storage_options: dict | None = None,
          format_id: str = FORMAT_ID, files: dict[str, bytes] | None = None) -> str:
    """Write one folder at ``url``: the tensors and any extra ``files`` (name -> bytes, e.g. a
    tokenizer.json) first, then ``meta.json`` (with the tensors' hash) last."""
    from safetensors.torch import save as st_save

    fs, folder = url_to_fs(url, storage_options)
    folder = folder.rstrip("/")
    stored, aliases = unshared(tensors)
    data = st_save(stored)
    if fs.exists(f"{folder}/{META}"):
        fs.rm_file(f"{folder}/{META}")  # a folder written before stops being one before its tensors change
    atomic.write_bytes(fs, f"{folder}/{TENSORS}", data)
    for name, content in (files or {}).items():
        atomic.write_bytes(fs, f"{folder}/{name}", content)
    doc = {"format": format_id, "version": VERSION, "tensors_hash": digest_bytes(data), "tensors_bytes": len(data),
           **meta}
    if aliases:
        doc["tensor_aliases"] = aliases
    atomic.write_bytes(fs, f"{folder}/{META}", sealed_json(doc, default=_jsonable))
    return url.rstrip("/")


def save(root_url: str, step: int, tensors: dict[str, Any], meta: dict[str, Any],
         storage_options: dict | None = None, keep_last: int = 3, files: dict[str, bytes] | None = None) -> str:
    """Write checkpoint ``step`` under ``root_url``; return its URL. ``tensors``: name -> torch.Tensor."""
    url = write(f"{root_url.rstrip('/')}/{_name(step)}", tensors, {"step": step, **meta}, storage_options,
                files=files)
    fs, root = url_to_fs(root_url, storage_options)
    prune(fs, root.rstrip("/"), keep_last)
    return url


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def steps(fs, root: str) -> list[int]:
    """Steps of complete checkpoints (those with ``meta.json``), ascending."""
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, OSError):
        return []
    found = []
    for path in entries:
        m = _DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
        if m and fs.exists(f"{path.rstrip('/')}/{META}"):
            found.append(int(m.group(1)))
    return sorted(found)


def prune(fs, root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for step in steps(fs, root)[:-keep_last]:
        folder = f"{root}/{_name(step)}"
        fs.rm_file(f"{folder}/{META}")  # first: the folder stops being a checkpoint
        fs.rm(folder, recursive=True)


def latest(root_url: str, storage_options: dict | None = None) -> str | None:
    fs, root = url_to_fs(root_url, storage_options)
    found = steps(fs, root.rstrip("/"))
    return f"{root_url.rstrip('/')}/{_name(found[-1])}" if found else None


def latest_intact(root_url: str, storage_options: dict | None = None) -> tuple[str | None, list[str]]:
    """The newest checkpoint under ``root_url`` whose metadata and tensors check out, and what
    is wrong with each newer one (skipped). ``(None, [])`` without checkpoints; raises
    :class:`IntegrityError` when there are some and every one is damaged."""
    fs, root = url_to_fs(root_url, storage_options)
    damaged = []
    for step in reversed(steps(fs, root.rstrip("/"))):
        url = f"{root_url.rstrip('/')}/{_name(step)}"
        try:
            check_intact(url, storage_options)
        except (IntegrityError, ManifestError) as exc:
            damaged.append(str(exc))
            continue
        return url, damaged
    if damaged:
        raise IntegrityError(
            f"every checkpoint under {root_url!r} is damaged ({'; '.join(damaged)}); "
            "start over with --no-resume (resume=False) or another checkpoint folder"
        )
    return None, []


def check_intact(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """A checkpoint's metadata, once it and the tensors' hash check out (tensors not decoded)."""
    url, meta = read_meta(url, storage_options)
    _tensor_bytes(url, meta, storage_options, verify=True)
    return meta


def _tensor_bytes(url: str, meta: dict[str, Any], storage_options: dict | None, verify: bool) -> bytes:
    fs, folder = url_to_fs(url, storage_options)
    try:
        data = fs.cat_file(f"{folder.rstrip('/')}/{TENSORS}")
    except FileNotFoundError:
        raise ManifestError(f"checkpoint {url!r} has {META} but no {TENSORS}") from None
    if verify and digest_bytes(data) != meta.get("tensors_hash"):
        raise IntegrityError(f"checkpoint {url}/{TENSORS} is corrupt: its hash does not match {META}")
    return data


def resolve(url: str, storage_options: dict | None = None) -> str:
    """A checkpoint folder, or the latest checkpoint under a root; refuses pickles."""
    lower = url.lower().rstrip("/")
    if lower.endswith(PICKLE_SUFFIXES):
        raise ConfigError(
            f"{url!r} is not a safetensors checkpoint: pickled checkpoints ({', '.join(PICKLE_SUFFIXES)}) "
            "are refused because loading them can run code; save a safetensors checkpoint with Swarm"
        )
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    if lower.endswith(".safetensors") or lower.endswith(META):
        path = path.rsplit("/", 1)[0]
        url = url.rstrip("/").rsplit("/", 1)[0]
    with reaching(url):
        if fs.exists(f"{path}/{META}"):
            return url.rstrip("/")
        found = latest(url, storage_options)
    if found is None:
        raise ManifestError(f"no checkpoint at {url!r} (expected {META} there or ckpt-* folders with one)")
    return found


def read_meta(url: str, storage_options: dict | None = None,
              formats: tuple[str, ...] = (FORMAT_ID,)) -> tuple[str, dict[str, Any]]:
    """``(resolved folder URL, meta)`` of a checkpoint or model folder, without its tensors."""
    url = resolve(url, storage_options)
    fs, folder = url_to_fs(url, storage_options)
    try:
        meta = json.loads(fs.cat_file(f"{folder.rstrip('/')}/{META}"))
    except ValueError as exc:
        raise ManifestError(f"{url}/{META} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") not in formats or meta.get("version") not in SUPPORTED_VERSIONS:
        got = meta if isinstance(meta, dict) else {}
        raise ManifestError(
            f"{url}/{META} is not a {' or '.join(formats)} folder of version "
            f"{' or '.join(map(str, SUPPORTED_VERSIONS))} (format {got.get('format')!r}, version {got.get('version')!r})"
        )
    check_sealed(meta, f"{url}/{META}", required=meta["version"] >= 2,
                 fix="use an earlier checkpoint, or train (or optimize) again to rewrite it")
    return url, meta


def load(url: str, storage_options: dict | None = None, verify: bool = True,
         formats: tuple[str, ...] = (FORMAT_ID,)) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(tensors, meta)`` from a checkpoint folder or root (its latest checkpoint).

    ``formats``: the folder formats the caller can use (training checkpoints by default).
    """
    from safetensors.torch import load as st_load

    url, meta = read_meta(url, storage_options, formats)
    data = _tensor_bytes(url, meta, storage_options, verify)
    try:
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise IntegrityError(f"{url}/{TENSORS} is not a valid safetensors file: {exc}") from None
    for alias, name in (meta.get("tensor_aliases") or {}).items():
        if name not in tensors:
            raise IntegrityError(f"{url}/{META} names tensor {alias!r} an alias of {name!r}, which is not stored")
        tensors[alias] = tensors[name]
    return tensors, meta

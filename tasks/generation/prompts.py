"""Prompts for offline generation, read from a staged dataset or JSON Lines files.

A staged dataset (a text dataset, or any staged table) gives one unit of prompts per shard;
JSON Lines files (a file, a folder of ``*.jsonl``, or a glob, on any fsspec URL) give one
unit per ``prompts_per_shard`` lines of a file. A unit is what one output shard answers,
row for row; its :class:`~storage.manifest.ShardEntry` (name, split, rows, content hash)
names that shard, so a re-run finds the finished ones. Each row keeps an ``id``: the
source's own ``id`` field where it has one, else the row's place in the whole source.

The prompt is the text of ``prompt_column`` (default ``prompt``, else ``text``), encoded
with the model's tokenizer; a text dataset without text gives its token ids: an unpacked
one each document's (without the trailing end-of-text, cut to ``prompt_tokens`` when
given), a packed one the first ``prompt_tokens`` of each block (padding left out).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa

from storage.dataset import Dataset
from storage.errors import ConfigError, SourceError
from storage.manifest import ShardEntry
from storage.urls import url_to_fs

DEFAULT_COLUMNS = ("prompt", "text")
JSONL_SPLIT = "prompts"  # the split of JSON Lines prompts in the output's manifest
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class PromptBatch:
    """One unit's prompts: ``tokens[i]`` is row ``i``'s prompt, ``texts[i]`` its text."""

    entry: ShardEntry
    ids: list[str]
    texts: list[str]
    tokens: list[list[int]] = field(default_factory=list)


def read_prompts(prompts: str, storage_options: dict, prompt_column: str | None, split: str | None,
                 prompts_per_shard: int, tokenizer, prompt_tokens: int | None = None) -> list[PromptBatch]:
    """Every unit of prompts of ``prompts``, encoded with ``tokenizer`` (None: the model has none)."""
    fs, path = url_to_fs(prompts, storage_options)
    path = path.rstrip("/")
    try:
        staged = fs.isdir(path) and fs.exists(f"{path}/index.json")
    except OSError as exc:
        raise SourceError(f"cannot read prompts {prompts!r}: {exc}") from None
    if staged:
        batches = _from_dataset(Dataset.open(prompts, storage_options), prompt_column, split, tokenizer,
                                prompt_tokens)
    else:
        if split is not None:
            raise ConfigError(f"split {split!r} is given but prompts {prompts!r} are JSON Lines, not a staged dataset")
        batches = _from_jsonl(fs, path, prompts, prompt_column, prompts_per_shard, tokenizer)
    if not batches:
        raise ConfigError(f"prompts {prompts!r} hold no prompts")
    return batches


def prompts_hash(prompts: str, storage_options: dict) -> str:
    """The prompts' identity without reading them all: a staged dataset's manifest content
    hash, else the hash of the JSON Lines files' names and bytes."""
    fs, path = url_to_fs(prompts, storage_options)
    path = path.rstrip("/")
    if fs.isdir(path) and fs.exists(f"{path}/index.json"):
        return Dataset.open(prompts, storage_options).manifest.content_hash()
    digest = hashlib.sha256()
    for file in _jsonl_files(fs, path, prompts):
        digest.update(posixpath.basename(file).encode() + b"\0" + hashlib.sha256(fs.cat_file(file)).digest())
    return digest.hexdigest()


def _choose(names: list[str], given: str | None, where: str, tokens_fallback: bool = False) -> str | None:
    if given is not None:
        if given not in names:
            raise ConfigError(f"prompt column {given!r} is not in {where} (columns: {', '.join(names) or 'none'})")
        return given
    found = next((c for c in DEFAULT_COLUMNS if c in names), None)
    if found is None and not tokens_fallback:
        raise ConfigError(f"{where} has no 'prompt' or 'text' column (columns: {', '.join(names) or 'none'}); "
                          f"name the prompts' column with --prompt-column")
    return found


def _encode(texts: list[str], tokenizer, where: str) -> list[list[int]]:
    if tokenizer is None:
        raise ConfigError(f"the model has no tokenizer.json, so the text prompts of {where} cannot be encoded; "
                          f"give a model folder with its tokenizer")
    return [e.ids for e in tokenizer.encode_batch(texts)] if texts else []


def _from_dataset(ds: Dataset, given: str | None, split: str | None, tokenizer,
                  prompt_tokens: int | None) -> list[PromptBatch]:
    meta = ds.manifest.metadata
    text = meta.get("kind") == "text"
    column = _choose(ds.schema.names, given, f"dataset {ds.url!r}", tokens_fallback=text)
    if column is None and meta.get("packing") == "packed" and prompt_tokens is None:
        raise ConfigError(f"dataset {ds.url!r} is a packed text dataset without text: its rows are blocks, not "
                          f"prompts; give --prompt-tokens N (each block's first N tokens are a prompt), or stage "
                          f"the prompts with --packing unpacked --keep-text")
    if column is not None and not pa.types.is_string(ds.schema.field(column).type) \
            and not pa.types.is_large_string(ds.schema.field(column).type):
        raise ConfigError(f"prompt column {column!r} of dataset {ds.url!r} is {ds.schema.field(column).type}, "
                          f"not text")
    if split is not None and split not in ds.manifest.splits:
        raise ConfigError(f"split {split!r} is not in dataset {ds.url!r}; it has: {', '.join(ds.manifest.splits)}")
    eot, pad = meta.get("eot_id"), meta.get("pad_id")
    batches, index = [], 0
    for entry in ds.shards(split):
        table = ds.read_shard(entry, verify=True)
        ids = (table.column("id").to_pylist() if "id" in table.column_names
               else list(range(index, index + table.num_rows)))
        index += table.num_rows
        if column is not None:
            texts = ["" if t is None else t for t in table.column(column).to_pylist()]
            tokens = _encode(texts, tokenizer, f"dataset {ds.url!r}")
        else:
            tokens = [t[:-1] if t and t[-1] == eot else t for t in table.column("tokens").to_pylist()]
            tokens = [[i for i in t[:prompt_tokens] if i != pad] for t in tokens]
            texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else [""] * len(tokens)
        batches.append(PromptBatch(entry, [str(i) for i in ids], texts, tokens))
    return batches


def _jsonl_files(fs, path: str, url: str) -> list[str]:
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(JSONL_SUFFIXES))
    elif fs.exists(path):
        files = [path]
    else:
        raise SourceError(f"prompts {url!r} do not exist; give a staged dataset or JSON Lines files")
    if not files:
        raise SourceError(f"prompts {url!r} match no JSON Lines file ({', '.join(JSONL_SUFFIXES)})")
    return files


def _from_jsonl(fs, path: str, url: str, given: str | None, per_shard: int, tokenizer) -> list[PromptBatch]:
    batches, index, column = [], 0, None
    for file in _jsonl_files(fs, path, url):
        rows = _read_jsonl(fs, file)
        if rows and column is None:  # the first line decides, every line must have it
            column = _choose(sorted(rows[0][1]), given, f"{file!r}")
        ids, texts = [], []
        for line, row in rows:
            if column not in row:
                raise ConfigError(f"{file}:{line} has no prompt column {column!r} (fields: {', '.join(sorted(row))})")
            if not isinstance(row[column], str):
                raise ConfigError(f"{file}:{line}: prompt column {column!r} holds {type(row[column]).__name__}, "
                                  f"not text")
            ids.append(str(row["id"]) if "id" in row else str(index + len(ids)))
            texts.append(row[column])
        tokens = _encode(texts, tokenizer, f"{file!r}")
        for lo in range(0, len(texts), per_shard):
            hi = min(lo + per_shard, len(texts))
            body = json.dumps([ids[lo:hi], texts[lo:hi]]).encode()
            entry = ShardEntry(name=f"{posixpath.basename(file)}#{lo}-{hi}", split=JSONL_SPLIT, rows=hi - lo,
                               bytes=len(body), hash=hashlib.sha256(body).hexdigest())
            batches.append(PromptBatch(entry, ids[lo:hi], texts[lo:hi], tokens[lo:hi]))
        index += len(texts)
    return batches


def _read_jsonl(fs, file: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line."""
    try:
        text = fs.cat_file(file).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{file} is not UTF-8 text ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SourceError(f"{file}:{number} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise SourceError(f"{file}:{number} is a JSON {type(row).__name__}; each line must be an object")
        rows.append((number, row))
    return rows

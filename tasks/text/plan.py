"""Staging of text, the driver's side: is this text, with which tokenizer, and what the
manifest records. :mod:`tasks.staging` calls these at its plan and commit steps; the
workers' side is :mod:`tasks.text.tokenize`.

A source is staged as text where it is text files or a text built-in, or where the
options name a text column or a tokenizer. Without ``--tokenizer``, a byte-level BPE of
``--vocab-size`` ids is fitted on the train split (at most :data:`corpus.FIT_MAX_BYTES`
of it) and stored with the dataset; the manifest says so (``tokenizer.source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyarrow as pa

from storage import atomic
from storage.errors import ConfigError, SourceError
from storage.sources import TEXT_COLUMN, SourceUnit
from tasks.text import corpus
from tasks.text.options import DEFAULT_VOCAB_SIZE, TextOptions
from tasks.text.tokenize import TextCounts, TextSpec, tokenize_table  # noqa: F401 - staging's workers use them
from tasks.text.tokenizer import TOKENIZER_FILE, describe, fit_bpe, read_tokenizer_json, sha256_of

FITTED = "fitted:byte-level-bpe"


@dataclass(frozen=True)
class TextRequest:
    """What the options ask for, resolved enough to key the staging (no data read)."""

    column: str
    tokenizer_json: str | None  # None: fit one
    identity: dict[str, Any]


@dataclass(frozen=True)
class TextPlan:
    spec: TextSpec
    metadata: dict[str, Any]


def is_text(options: TextOptions, metadata: dict[str, Any], units: Iterable[Any]) -> bool:
    """Whether to stage as text: the options say so, or the source is text files (``units``
    or files of format ``text``) or a text built-in (its ``metadata``)."""
    return options.wants_text() or metadata.get("kind") == "text" or any(u.format == "text" for u in units)


def train_texts(units: list[SourceUnit], column: str, read, keep) -> Callable[[], Iterable[str]]:
    """A fresh iterator of the train split's texts on each call (read only if a tokenizer is fitted)."""
    return lambda: corpus.iter_texts(units, column, read, keep)


def request(options: TextOptions, source: str, storage_options: dict[str, Any]) -> TextRequest:
    """Resolve the tokenizer (read and checked, or to be fitted) and the staging's text key."""
    column = options.text_column or TEXT_COLUMN
    ident: dict[str, Any] = {"column": column, "packing": options.packing, "keep_text": options.keep_text}
    if options.packing == "packed":
        ident["seq_len"] = options.seq_len
    if options.tokenizer is None:
        text = None
        vocab = options.vocab_size or DEFAULT_VOCAB_SIZE
        ident["tokenizer"] = {"fit": {"vocab_size": vocab, "max_bytes": corpus.FIT_MAX_BYTES}}
    else:
        text = read_tokenizer_json(options.tokenizer, storage_options)
        describe(text, options.tokenizer)  # refuse one without end-of-text now, before any fitting or reading
        ident["tokenizer"] = {"source": options.tokenizer, "sha256": sha256_of(text)}
    return TextRequest(column, text, ident)


def check_column(req: TextRequest, schema: pa.Schema, source: str) -> None:
    if req.column not in schema.names:
        raise ConfigError(
            f"text column {req.column!r} is not in source {source!r}; its columns: {', '.join(schema.names)} "
            "(choose one with --text-column)"
        )
    kind = schema.field(req.column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"text column {req.column!r} of source {source!r} holds {kind}, not text")


def prepare(
    req: TextRequest, options: TextOptions, source: str, base: dict[str, Any], train_texts: Callable[[], Iterable[str]]
) -> TextPlan:
    """Fit the tokenizer if none was given, and fix what the workers and the manifest need."""
    text = req.tokenizer_json
    if text is None:
        try:
            text = fit_bpe(train_texts(), req.identity["tokenizer"]["fit"]["vocab_size"])
        except SourceError:
            raise SourceError(f"source {source!r} holds no text in its train split to fit a tokenizer on") from None
        origin = f"{FITTED}?vocab_size={req.identity['tokenizer']['fit']['vocab_size']} (train split of {source})"
    else:
        origin = options.tokenizer
    info = describe(text, origin)
    spec = TextSpec(req.column, text, info.eot_id, info.pad_id, info.dtype, options.packing, options.seq_len,
                    options.keep_text)
    keep = {k: v for k, v in base.items() if k not in ("label", "feature", "shape", "num_classes")}
    metadata = {
        **keep,
        "kind": "text",
        "feature": "tokens",
        "text_column": req.column,
        "vocab_size": info.vocab_size,
        "eot_id": info.eot_id,
        "pad_id": info.pad_id,
        "packing": options.packing,
        "dtype": info.dtype,
        "tokenizer": {"source": origin, "sha256": info.sha256, "file": TOKENIZER_FILE},
    }
    if options.packing == "packed":
        metadata["seq_len"] = options.seq_len
        metadata["partial_block"] = "padded" if info.pad_id is not None else "dropped"
    return TextPlan(spec, metadata)


def before_manifest(fs, root: str, plan: TextPlan, stats: list[dict[str, int]]) -> tuple[pa.Schema, dict[str, Any]]:
    """Store the tokenizer beside the shards; the manifest's schema and metadata."""
    counts = TextCounts()
    for s in stats:
        counts.add(TextCounts(**s))
    if counts.tokens == counts.documents:
        raise SourceError("every document of the source is empty; nothing to tokenize")
    atomic.write_bytes(fs, f"{root}/{TOKENIZER_FILE}", plan.spec.tokenizer_json.encode())
    metadata = {**plan.metadata, "documents": counts.documents, "tokens": counts.tokens}
    if plan.spec.packing == "packed":
        metadata["padding_tokens"] = counts.padding
        metadata["dropped_tokens"] = counts.dropped
    return plan.spec.schema(), metadata


def summary(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What a staging result reports of text (None for other data)."""
    if metadata.get("kind") != "text":
        return None
    keys = ("documents", "tokens", "vocab_size", "dtype", "packing", "seq_len")
    return {k: metadata[k] for k in keys if k in metadata} | {"tokenizer": metadata["tokenizer"]["source"]}

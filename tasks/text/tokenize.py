"""Documents to token rows, on the workers: encode, append end-of-text, pack or not.

Packed: a shard's documents (one split of one shard) are concatenated, each followed by
``eot_id``, and cut into blocks of exactly ``seq_len`` ids; the last partial block is
padded with ``pad_id``, or dropped where the tokenizer has no padding token. Packing per
shard keeps every shard a pure function of its own documents (content-addressed,
idempotent, resumable) at the cost of at most one partial block per shard and split.

Unpacked: one row per document, its ids ending with ``eot_id``, and its ``length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa

from storage.errors import SourceError
from tasks.text.tokenizer import from_json


@dataclass(frozen=True)
class TextSpec:
    """What a write task needs to tokenize (small: the tokenizer travels as its JSON)."""

    text_column: str
    tokenizer_json: str
    eot_id: int
    pad_id: int | None
    dtype: str
    packing: str
    seq_len: int
    keep_text: bool = False

    def schema(self) -> pa.Schema:
        ids = pa.from_numpy_dtype(np.dtype(self.dtype))
        if self.packing == "packed":
            return pa.schema([pa.field("tokens", pa.list_(ids, self.seq_len))])
        fields = [pa.field("tokens", pa.list_(ids)), pa.field("length", pa.int32())]
        if self.keep_text:
            fields.append(pa.field(self.text_column, pa.string()))
        return pa.schema(fields)


@dataclass
class TextCounts:
    documents: int = 0
    tokens: int = 0  # ids stored, end-of-text included, padding not
    padding: int = 0
    dropped: int = 0  # ids of final partial blocks dropped (no padding token)

    def add(self, other: "TextCounts") -> None:
        for name in ("documents", "tokens", "padding", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


#: Texts are encoded in batches of about this many characters, so that the Python lists of
#: ids (about 36 bytes an id) stay small beside a shard's texts.
BATCH_CHARS = 8_000_000


def encode(texts: list[str | None], spec: TextSpec) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids, each followed by end-of-text, as one flat array, and each one's length."""
    tokenizer = from_json(spec.tokenizer_json)
    batch_encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    docs = ["" if t is None else t for t in texts]
    flats, lengths, eot = [], [], (spec.eot_id,)
    start = 0
    while start < len(docs):
        stop, chars = start, 0
        while stop < len(docs) and (stop == start or chars < BATCH_CHARS):
            chars += len(docs[stop])
            stop += 1
        ids = [e.ids for e in batch_encode(docs[start:stop], add_special_tokens=False)]
        sizes = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
        flats.append(np.fromiter(chain.from_iterable(chain(i, eot) for i in ids), dtype=np.dtype(spec.dtype),
                                 count=int(sizes.sum())))
        lengths.append(sizes)
        start = stop
    if not flats:
        return np.zeros(0, np.dtype(spec.dtype)), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(lengths)


def tokenize_table(table: pa.Table, spec: TextSpec) -> tuple[pa.Table, TextCounts]:
    """A table of documents as token rows (see the module docstring), and what it holds."""
    if spec.text_column not in table.column_names:
        raise SourceError(f"text column {spec.text_column!r} is missing from a part of the source")
    texts = table.column(spec.text_column).to_pylist()
    flat, lengths = encode(texts, spec)
    counts = TextCounts(documents=len(texts), tokens=len(flat))
    ids_type = pa.from_numpy_dtype(flat.dtype)
    if spec.packing == "unpacked":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        columns = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, ids_type)),
                   pa.array(lengths.astype(np.int32))]
        if spec.keep_text:
            columns.append(pa.array(texts, pa.string()))
        return pa.Table.from_arrays(columns, schema=spec.schema()), counts
    rest = len(flat) % spec.seq_len
    if rest and spec.pad_id is not None:
        counts.padding = spec.seq_len - rest
        flat = np.concatenate([flat, np.full(counts.padding, spec.pad_id, dtype=flat.dtype)])
    elif rest:
        counts.dropped = rest
        flat = flat[: len(flat) - rest]
    blocks = pa.FixedSizeListArray.from_arrays(pa.array(flat, ids_type), spec.seq_len)
    return pa.Table.from_arrays([blocks], schema=spec.schema()), counts


def documents_of(tokens: np.ndarray, eot_id: int) -> list[np.ndarray]:
    """Split a flat run of ids after every end-of-text (the inverse of packing, padding aside)."""
    ends = np.flatnonzero(tokens == eot_id)
    return [tokens[a:b] for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]

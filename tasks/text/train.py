"""``swarm tokenizer train SOURCE OUT``: fit a byte-level BPE on any staging source.

The source is read as staging reads it (text files, a text column of a table, a text
built-in), in order, up to :data:`tasks.text.corpus.FIT_MAX_BYTES` of text; the tokenizer
(with ``<|endoftext|>`` and ``<|pad|>``) is written atomically as a ``tokenizer.json``.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from storage.errors import SourceError
from tasks.staging import StorageAccess, inspect_source, read_rows
from tasks.text import corpus
from tasks.text.options import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE
from tasks.text.plan import TextRequest, check_column
from tasks.text.tokenizer import describe, fit_bpe, write_tokenizer

UNIT_BYTES = 64_000_000  # how much of the source one read covers


class TokenizerConfig(StorageAccess):
    """Parameters of ``swarm tokenizer train``."""

    source: str = Field(description="Text source: .txt/.md/.py files, a table with a text column, or a text built-in")
    out: str = Field(description="Where to write tokenizer.json: a file URL, or a folder to hold it")
    vocab_size: int = Field(ge=MIN_VOCAB_SIZE, le=MAX_VOCAB_SIZE, description="Vocabulary size, special tokens included")
    text_column: str = Field("text", description="Text column of a JSON Lines/Parquet/CSV source")
    format: Literal["auto", "parquet", "csv", "jsonl", "text"] = Field("auto", description="Source file format")


class TokenizerResult(BaseModel):
    path: str
    vocab_size: int
    eot_id: int
    pad_id: int | None
    sha256: str
    seconds: float


def train_tokenizer(config: TokenizerConfig) -> TokenizerResult:
    """Fit and store the tokenizer; refuses a source without text, writing nothing."""
    started = time.perf_counter()
    schema, units, _, _, _, _ = inspect_source(config, unit_bytes=UNIT_BYTES)
    check_column(TextRequest(config.text_column, None, {}), schema, config.source)
    texts = corpus.iter_texts(units, config.text_column, lambda u: read_rows(u, schema, config.storage_options))
    try:
        text = fit_bpe(texts, config.vocab_size)
    except SourceError:
        raise SourceError(f"source {config.source!r} holds no text to fit a tokenizer on") from None
    info = describe(text, config.out)
    path = write_tokenizer(text, config.out, config.storage_options)
    return TokenizerResult(path=path, vocab_size=info.vocab_size, eot_id=info.eot_id, pad_id=info.pad_id,
                           sha256=info.sha256, seconds=round(time.perf_counter() - started, 3))


@task(name="fit-tokenizer", cache_policy=NO_CACHE)
def train_tokenizer_task(config: TokenizerConfig) -> TokenizerResult:
    """Fit a byte-level BPE on a source and store its tokenizer.json."""
    return train_tokenizer(config)

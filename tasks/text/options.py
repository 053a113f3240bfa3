"""The options of text staging, as fields of the staging configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 260  # the 256 byte symbols and the special tokens
MAX_VOCAB_SIZE = 2**31 - 1


class TextOptions(BaseModel):
    """How text is tokenized and laid out (used where the source is text)."""

    text_column: str | None = Field(
        None, description="Text column of a JSON Lines/Parquet/CSV source (stages it as text); default 'text'"
    )
    tokenizer: str | None = Field(
        None, description="Hugging Face tokenizer.json (any fsspec URL); default: fit a byte-level BPE on the train split"
    )
    vocab_size: int | None = Field(
        None, ge=MIN_VOCAB_SIZE, le=MAX_VOCAB_SIZE,
        description=f"Vocabulary of the tokenizer fitted when no --tokenizer is given (default {DEFAULT_VOCAB_SIZE})",
    )
    seq_len: int = Field(1024, ge=2, le=2**24, description="Tokens per packed block (text only)")
    packing: Literal["packed", "unpacked"] = Field(
        "packed", description="Text: 'packed' fixed --seq-len blocks, or 'unpacked' one row per document"
    )
    keep_text: bool = Field(False, description="Unpacked text: keep each document's text beside its tokens")

    @model_validator(mode="after")
    def _consistent(self) -> "TextOptions":
        if self.tokenizer is not None and self.vocab_size is not None:
            raise ValueError("--vocab-size applies only when a tokenizer is fitted; drop it or drop --tokenizer")
        if self.keep_text and self.packing == "packed":
            raise ValueError("--keep-text needs --packing unpacked (a packed block mixes documents)")
        return self

    def wants_text(self) -> bool:
        """Whether these options alone make a table source text."""
        return self.text_column is not None or self.tokenizer is not None

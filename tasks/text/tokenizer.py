"""Hugging Face ``tokenizer.json`` files: load, inspect, fit and store (the ``tokenizers`` library).

Tokenizers are never reimplemented here: loading is ``Tokenizer.from_str``, fitting is the
library's byte-level BPE trainer. What this module adds is what staging needs to know of
one (its end-of-text and padding ids, the narrowest id type) and clear errors.

Special tokens written literally in a document (say ``<|endoftext|>`` inside a Python
file) are encoded as ordinary text (``encode_special_tokens``), so only the end-of-text
id staging appends marks a document boundary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

from storage import atomic
from storage.errors import ConfigError, SourceError
from storage.urls import url_to_fs

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerInfo:
    """What staging records of a tokenizer."""

    json: str
    sha256: str
    vocab_size: int
    eot_id: int
    pad_id: int | None
    dtype: str


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_tokenizer_json(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The text of a tokenizer.json at any fsspec URL, refused unless the library loads it."""
    fs, path = url_to_fs(url, storage_options)
    try:
        if fs.isdir(path):
            raise ConfigError(f"tokenizer {url!r} is a folder; give the tokenizer.json file inside it")
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ConfigError(f"tokenizer {url!r} does not exist; give a Hugging Face tokenizer.json") from None
    except OSError as exc:
        raise ConfigError(f"cannot read tokenizer {url!r}: {exc}") from None
    try:
        text = data.decode("utf-8")
        from_json(text)
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exception for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"tokenizer {url!r} is not a Hugging Face tokenizer.json ({first})") from None
    return text


@lru_cache(maxsize=4)
def from_json(text: str):
    """A ready tokenizer from its JSON (cached: workers load each tokenizer once)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(text)
    tokenizer.encode_special_tokens = True  # see the module docstring
    return tokenizer


def describe(text: str, where: str) -> TokenizerInfo:
    """Ids and sizes of a tokenizer; refuses one without an end-of-text token."""
    tokenizer = from_json(text)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    eot = next((vocab[t] for t in EOT_CANDIDATES if t in vocab), None)
    if eot is None:
        raise ConfigError(
            f"tokenizer {where!r} has no end-of-text token to mark document boundaries; "
            f"it needs one of {', '.join(EOT_CANDIDATES)}"
        )
    pad = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), None)
    return TokenizerInfo(text, sha256_of(text), size, eot, pad, id_dtype(size))


def id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def fit_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """Fit a byte-level BPE (GPT-2 style, lossless) with end-of-text and padding tokens; its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    seen = 0

    def counted():
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise SourceError("no documents to fit a tokenizer on")
    return tokenizer.to_str()


def write_tokenizer(text: str, url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Store a tokenizer.json atomically at ``url`` (a file, or a folder to hold tokenizer.json)."""
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    if not path.endswith(".json") or fs.isdir(path):
        path = f"{path}/{TOKENIZER_FILE}"
    atomic.write_bytes(fs, path, text.encode())
    return fs.unstrip_protocol(path)


def dataset_tokenizer(fs, root: str, metadata: dict[str, Any]):
    """The tokenizer stored with a staged text dataset, checked against the manifest's hash."""
    from storage.errors import IntegrityError

    record = metadata.get("tokenizer") or {}
    path = f"{root.rstrip('/')}/{record.get('file', TOKENIZER_FILE)}"
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise IntegrityError(f"the dataset's tokenizer {path!r} is missing; stage the dataset again") from None
    if sha256_of(text) != record.get("sha256"):
        raise IntegrityError(f"the dataset's tokenizer {path!r} does not match the manifest's sha256; stage it again")
    return from_json(text)

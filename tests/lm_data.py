"""Token datasets for the language-model tests, staged as the data contract says (until text
staging lands, tests make their own): packed blocks of ``seq_len`` ids, documents each
followed by ``eot_id``, the last block padded with ``pad_id``, the manifest metadata, and
a copy of the tokenizer.json in the dataset folder (written before the manifest)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from storage import manifest as mf
from storage.shard_writer import ShardSpec, write_shard
from storage.urls import url_to_fs

WORDS = ("the quick brown fox jumps over the lazy dog and then runs home to sleep "
         "a model learns to predict the next word from the words before it").split()


def documents(n: int, seed: int = 0) -> list[str]:
    """Learnable text: windows of a fixed word sequence, at random offsets and lengths."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start, length = int(rng.integers(0, len(WORDS))), int(rng.integers(6, 20))
        docs.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 120):
    """A small byte-level BPE (the tokenizers library) with <|endoftext|> and <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def pack(docs: list[list[int]], seq_len: int, eot_id: int, pad_id: int | None) -> np.ndarray:
    flat = [t for doc in docs for t in (*doc, eot_id)]
    rows = -(-len(flat) // seq_len)
    if pad_id is None:
        rows = len(flat) // seq_len
        flat = flat[: rows * seq_len]
    else:
        flat += [pad_id] * (rows * seq_len - len(flat))
    return np.asarray(flat, dtype=np.int64).reshape(rows, seq_len)


def write_token_dataset(dest: str, blocks_by_split: dict[str, np.ndarray], metadata: dict, tokenizer_json: str | None,
                        rows_per_shard: int = 64) -> str:
    fs, root = url_to_fs(dest)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    dtype = np.uint16 if metadata["vocab_size"] <= 2**16 else np.uint32
    pa_type = pa.uint16() if dtype == np.uint16 else pa.uint32()
    seq_len = next(iter(blocks_by_split.values())).shape[1]
    schema = pa.schema([pa.field("tokens", pa.list_(pa_type, seq_len))])
    entries = []
    for split, blocks in blocks_by_split.items():
        for i, lo in enumerate(range(0, len(blocks), rows_per_shard)):
            part = blocks[lo:lo + rows_per_shard].astype(dtype)
            col = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1), type=pa_type), seq_len)
            entries.append(write_shard(fs, root, split, i, pa.Table.from_arrays([col], schema=schema), ShardSpec()).entry)
    meta = {"kind": "text", "packing": "packed", "seq_len": seq_len, "dtype": np.dtype(dtype).name, **metadata}
    if tokenizer_json is not None:
        data = tokenizer_json.encode()
        fs.pipe_file(f"{root}/tokenizer.json", data)
        meta["tokenizer"] = {"source": "test", "sha256": hashlib.sha256(data).hexdigest(), "file": "tokenizer.json"}
    mf.write(fs, root, mf.Manifest(shard_format="arrow", codec="zstd", level=3, schema=schema, shards=entries,
                                   metadata=meta, source={"test": True}, created="2026-01-01T00:00:00Z"))
    return dest


def text_dataset(dest: str, n_docs: int = 240, seq_len: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 vocab_size: int = 120) -> str:
    """A staged text dataset of learnable documents with its own BPE tokenizer."""
    texts = documents(n_docs, seed)
    tok = train_tokenizer(texts, vocab_size)
    eot, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    ids = [e.ids for e in tok.encode_batch(texts)]
    n_val = int(len(ids) * val_fraction)
    splits = {"train": pack(ids[n_val:], seq_len, eot, pad)}
    if n_val:
        splits["val"] = pack(ids[:n_val], seq_len, eot, pad)
    meta = {"vocab_size": tok.get_vocab_size(), "eot_id": eot, "pad_id": pad, "documents": len(ids),
            "tokens": sum(len(d) + 1 for d in ids)}
    return write_token_dataset(dest, splits, meta, tok.to_str())

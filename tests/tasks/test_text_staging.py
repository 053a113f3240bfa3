"""Staging text as plain functions: tokenization round trips, packing, id types, built-ins, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from storage.dataset import Dataset
from storage.errors import ConfigError, SourceError
from tasks.datasets import open_builtin
from tasks.staging import split_mask
from tasks.text.tokenize import documents_of
from tasks.text.tokenizer import dataset_tokenizer, fit_bpe, id_dtype
from tests.conftest import stage_plain

DOCS = [
    "Hello, world!\n",
    "",
    "héllo wörld — ünïcode 🎉\tand\ttabs\r\nCRLF\n",
    "a literal <|endoftext|> and <|pad|> inside a document",
    "   leading and trailing spaces   ",
    "def f(x):\n    return x * 2\n" * 40,  # longer than a block
    "\n\n\n",
    "the quick brown fox jumps over the lazy dog " * 25,
] * 3


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(fit_bpe(DOCS, 400))
    return str(path)


def _jsonl(path, docs=DOCS):
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def decoded_documents(url: str, split: str, storage_options=None) -> list[str]:
    """Every document of a split of a staged text dataset, decoded, in order."""
    ds = Dataset.open(url, storage_options)
    meta = ds.manifest.metadata
    tokenizer = dataset_tokenizer(ds.fs, ds.root, meta)
    if split not in ds.manifest.splits:
        return []
    table = ds.read_table(split)
    if meta["packing"] == "unpacked":
        rows = table.column("tokens").to_pylist()
        assert all(r[-1] == meta["eot_id"] and len(r) == n for r, n in zip(rows, table.column("length").to_pylist()))
        return [tokenizer.decode(r[:-1], skip_special_tokens=False) for r in rows]
    docs = []
    for shard in ds.shards(split):  # padding ends a shard's blocks; documents never straddle shards
        flat = ds.read_shard(shard).column("tokens").combine_chunks().flatten().to_numpy()
        if meta["pad_id"] is not None:
            flat = flat[flat != meta["pad_id"]]
        docs += [tokenizer.decode(d.tolist(), skip_special_tokens=False) for d in documents_of(flat, meta["eot_id"])]
    return docs


def expected(docs, split, seed=0, fraction=0.0):
    val = split_mask(np.arange(len(docs)), seed, fraction)
    return [d for d, v in zip(docs, val) if v == (split == "val")]


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("packing", ["packed", "unpacked"])
@pytest.mark.parametrize("shard_format", ["arrow", "parquet"])
def test_round_trip_every_codec_local(tmp_path, tokenizer_file, codec, packing, shard_format):
    dest = str(tmp_path / "ds")
    result = stage_plain(source=_jsonl(tmp_path / "docs.jsonl"), dest=dest, text_column="body", tokenizer=tokenizer_file,
                         codec=codec, packing=packing, seq_len=16, val_fraction=0.3, shard_size=800,
                         shard_format=shard_format)
    assert result.shards >= 4 and set(result.splits) == {"train", "val"}
    for split in ("train", "val"):
        assert decoded_documents(dest, split) == expected(DOCS, split, fraction=0.3)
    meta = Dataset.open(dest).manifest.metadata
    assert meta["kind"] == "text" and meta["documents"] == len(DOCS) and meta["packing"] == packing
    assert meta["tokenizer"]["source"] == tokenizer_file and meta["dtype"] == "uint16"


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_round_trip_text_files_on_s3(s3, bucket, tokenizer_file, codec):
    fs, opts = s3.s3fs(), s3.storage_options
    names = [f"raw/{i // 10}/{['', '_', '__'][i % 4 % 3]}doc{i:02d}{['.txt', '.md', '.py'][i % 3]}"
             for i in range(len(DOCS))]  # _private.py and __init__.py-like names are documents too
    for name, doc in zip(names, DOCS):
        fs.pipe(f"{bucket}/{name}", doc.encode())
    fs.pipe(f"{bucket}/raw/_SUCCESS", b"")
    fs.pipe(f"{bucket}/raw/.hidden.txt", b"not a document")
    fs.put(tokenizer_file, f"{bucket}/tok/tokenizer.json")
    dest = f"s3://{bucket}/ds"
    stage_plain(source=f"s3://{bucket}/raw", dest=dest, tokenizer=f"s3://{bucket}/tok/tokenizer.json", codec=codec,
                seq_len=32, shard_size=500, storage_options=opts)
    in_path_order = [d for _, d in sorted(zip(names, DOCS))]
    assert decoded_documents(dest, "train", opts) == in_path_order
    assert fs.exists(f"{bucket}/ds/tokenizer.json")


def test_packed_blocks_hold_eot_after_every_document(tmp_path, tokenizer_file):
    from tasks.text.tokenizer import from_json

    tok = from_json(open(tokenizer_file).read())
    docs = [d for d in DOCS[:8] if d]
    dest = str(tmp_path / "ds")
    stage_plain(source=_jsonl(tmp_path / "d.jsonl", docs), dest=dest, text_column="body", tokenizer=tokenizer_file,
                seq_len=24)
    ds = Dataset.open(dest)
    meta = ds.manifest.metadata
    blocks = ds.read_table().column("tokens").to_numpy(zero_copy_only=False)
    flat = np.concatenate(blocks)
    assert all(len(b) == 24 for b in blocks) and ds.manifest.schema.field("tokens").type.list_size == 24
    lengths = [len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs]
    assert list(np.flatnonzero(flat == meta["eot_id"])) == list(np.cumsum(lengths) - 1)
    pad = flat[sum(lengths):]
    assert len(pad) == meta["padding_tokens"] < 24 and (pad == meta["pad_id"]).all()
    assert meta["tokens"] == sum(lengths) and meta["partial_block"] == "padded"


def _word_level(path, size: int, pad: bool) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"] + (["<pad>"] if pad else []))
    tok.save(str(path))
    return str(path)


def test_narrowest_id_type_and_dropped_partial_block(tmp_path):
    assert id_dtype(2**16) == "uint16" and id_dtype(2**16 + 1) == "uint32"
    big = _word_level(tmp_path / "big.json", 70_000, pad=False)
    src = _jsonl(tmp_path / "d.jsonl", ["w1 w69999 w5", "w65536 w2"])
    stage_plain(source=src, dest=str(tmp_path / "big"), text_column="body", tokenizer=big, seq_len=3)
    ds = Dataset.open(str(tmp_path / "big"))
    meta = ds.manifest.metadata
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["eot_id"] == 70_000
    assert ds.schema.field("tokens").type == pa.list_(pa.uint32(), 3)
    assert ds.read_table().column("tokens").to_pylist() == [[1, 69999, 5], [70_000, 65536, 2]]
    assert meta["pad_id"] is None and meta["partial_block"] == "dropped" and meta["dropped_tokens"] == 1
    small = _word_level(tmp_path / "small.json", 1000, pad=True)
    stage_plain(source=src.replace("69999", "999").replace("65536", "7"), dest=str(tmp_path / "small"),
                text_column="body", tokenizer=small, packing="unpacked")
    assert Dataset.open(str(tmp_path / "small")).schema.field("tokens").type == pa.list_(pa.uint16())


def test_fitted_tokenizer_is_recorded_and_reruns_skip(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl")
    dest = str(tmp_path / "ds")
    first = stage_plain(source=src, dest=dest, text_column="body", vocab_size=300, seq_len=32, val_fraction=0.25)
    meta = Dataset.open(dest).manifest.metadata
    assert meta["tokenizer"]["source"].startswith("fitted:byte-level-bpe?vocab_size=300")
    assert meta["vocab_size"] == 300 and meta["eot_id"] is not None and meta["pad_id"] is not None
    assert decoded_documents(dest, "val") == expected(DOCS, "val", fraction=0.25)
    again = stage_plain(source=src, dest=dest, text_column="body", vocab_size=300, seq_len=32, val_fraction=0.25)
    assert again.up_to_date and again.manifest_hash == first.manifest_hash
    longer = stage_plain(source=src, dest=dest, text_column="body", vocab_size=300, seq_len=64, val_fraction=0.25)
    assert not longer.up_to_date and Dataset.open(dest).manifest.metadata["seq_len"] == 64


def test_builtin_text_datasets(tmp_path, tokenizer_file):
    help_docs = open_builtin("python-help").read(0, 10_000).column("text").to_pylist()
    assert len(help_docs) > 50 and sum(map(len, help_docs)) > 300_000
    stage_plain(source="python-help", dest=str(tmp_path / "help"), tokenizer=tokenizer_file, seq_len=256)
    assert decoded_documents(str(tmp_path / "help"), "train") == help_docs
    source = "python-stdlib?max_files=4"
    stdlib = open_builtin(source).read(0, 4).column("text").to_pylist()
    assert len(stdlib) == 4 and all(stdlib)
    stage_plain(source=source, dest=str(tmp_path / "lib"), tokenizer=tokenizer_file, packing="unpacked", keep_text=True)
    assert decoded_documents(str(tmp_path / "lib"), "train") == stdlib
    assert Dataset.open(str(tmp_path / "lib")).read_table().column("text").to_pylist() == stdlib
    with pytest.raises(ConfigError, match="max_files=0 is out of range"):
        open_builtin("python-stdlib?max_files=0")


def _bad_sources(t):
    (t / "docs.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (t / "numbers.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    (t / "notatokenizer.json").write_text('{"hello": "world"}')
    (t / "empty").mkdir()
    (t / "empty" / "a.txt").write_text("")
    (t / "empty" / "b.md").write_text("")
    (t / "latin1").mkdir()
    (t / "latin1" / "a.txt").write_bytes("café".encode("latin-1"))
    _word_level(t / "noeot.json", 10, pad=False)
    noeot = json.loads((t / "noeot.json").read_text())
    noeot["added_tokens"] = []
    (t / "noeot.json").write_text(json.dumps(noeot))


BAD = [
    (dict(source="{t}/docs.jsonl", text_column="text"), ConfigError, "text column 'text' is not in source .*its columns: body"),
    (dict(source="{t}/numbers.jsonl", text_column="text"), ConfigError, "holds int64, not text"),
    (dict(source="python-help", tokenizer="{t}/notatokenizer.json"), ConfigError, "is not a Hugging Face tokenizer.json"),
    (dict(source="python-help", tokenizer="{t}/missing.json"), ConfigError, "does not exist"),
    (dict(source="python-help", tokenizer="{t}/noeot.json"), ConfigError, "has no end-of-text token"),
    (dict(source="{t}/empty"), SourceError, "holds no text"),
    (dict(source="{t}/latin1", tokenizer="{t}/tok.json"), SourceError, "is not UTF-8 text"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_text_input_writes_nothing(tmp_path, tokenizer_file, kwargs, error, message):
    _bad_sources(tmp_path)
    (tmp_path / "tok.json").write_text(open(tokenizer_file).read())
    kwargs = {k: v.format(t=tmp_path) for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        stage_plain(dest=str(tmp_path / "out"), **kwargs)
    if kwargs["source"].endswith("latin1"):
        assert not (tmp_path / "out" / "index.json").exists()  # found by a worker: no dataset
    else:
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(seq_len=1), "greater than or equal to 2"),
        (dict(seq_len=0), "greater than or equal to 2"),
        (dict(packing="zigzag"), "packing"),
        (dict(keep_text=True), "--keep-text needs --packing unpacked"),
        (dict(tokenizer="t.json", vocab_size=500), "--vocab-size applies only when a tokenizer is fitted"),
        (dict(vocab_size=10), "greater than or equal to 260"),
    ],
)
def test_bad_text_parameters(kwargs, message):
    from tasks.staging import StageConfig

    with pytest.raises(ValidationError, match=message):
        StageConfig(source="python-help", dest="/tmp/x", **kwargs)


def test_train_tokenizer_writes_atomically_and_refuses_empty(tmp_path):
    from tasks.text.train import TokenizerConfig, train_tokenizer
    from tasks.text.tokenizer import from_json

    result = train_tokenizer(TokenizerConfig(source=_jsonl(tmp_path / "d.jsonl"), out=str(tmp_path / "t.json"),
                                             vocab_size=300, text_column="body"))
    tok = from_json((tmp_path / "t.json").read_text())
    assert result.vocab_size == tok.get_vocab_size() == 300 and result.eot_id == tok.token_to_id("<|endoftext|>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "t.json"]  # no temporaries left
    _bad_sources(tmp_path)
    with pytest.raises(SourceError, match="holds no text"):
        train_tokenizer(TokenizerConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "out"), vocab_size=300))
    assert not (tmp_path / "out").exists()


def test_encoding_in_batches_gives_the_same_ids(tokenizer_file, monkeypatch):
    from tasks.text import tokenize
    from tasks.text.tokenizer import describe

    info = describe(open(tokenizer_file).read(), tokenizer_file)
    spec = tokenize.TextSpec("text", info.json, info.eot_id, info.pad_id, info.dtype, "packed", 16)
    whole = tokenize.encode(DOCS, spec)
    monkeypatch.setattr(tokenize, "BATCH_CHARS", 50)
    parts = tokenize.encode(DOCS, spec)
    assert (whole[0] == parts[0]).all() and (whole[1] == parts[1]).all() and len(whole[1]) == len(DOCS)

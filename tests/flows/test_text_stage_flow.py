"""Text staging and tokenizer training through the ``swarm`` CLI, on a real Dask cluster and Prefect API."""

from __future__ import annotations

import json

import pytest

from storage.dataset import Dataset
from tasks.datasets import open_builtin
from tests.conftest import run_cli
from tests.tasks.test_text_staging import decoded_documents, expected


def test_cli_tokenizer_train_then_stage_on_dask(dask_cluster, tmp_path):
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "python-help", str(out), "--vocab-size", "600")
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer trained" in proc.stdout and "600" in proc.stdout
    tokenizer = out / "tokenizer.json"
    assert tokenizer.exists() and not [p for p in out.iterdir() if p.name != "tokenizer.json"]

    dest = tmp_path / "help"
    args = ("stage", "python-help", str(dest), "--tokenizer", str(tokenizer), "--seq-len", "128", "--val-fraction", "0.2")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    docs = open_builtin("python-help").read(0, 1000).column("text").to_pylist()
    assert f"{len(docs)} documents" in proc.stdout and "tokens (packed, 128 ids a row, uint16)" in proc.stdout
    meta = Dataset.open(str(dest)).manifest.metadata
    assert meta["vocab_size"] == 600 and meta["seq_len"] == 128 and meta["tokenizer"]["source"] == str(tokenizer)
    for split in ("train", "val"):
        assert decoded_documents(str(dest), split) == expected(docs, split, fraction=0.2)
    again = run_cli(*args)
    assert again.returncode == 0 and "already staged" in again.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["stage", "{t}/docs.jsonl", "{out}", "--text-column", "text"], "text column 'text' is not in source"),
        (["stage", "{t}/docs.jsonl", "{out}", "--text-column", "body", "--tokenizer", "{t}/fake.json"],
         "is not a Hugging Face tokenizer.json"),
        (["stage", "python-help", "{out}", "--seq-len", "1"], "invalid seq-len (got 1)"),
        (["stage", "{t}/empty", "{out}"], "holds no text"),
        (["tokenizer", "train", "{t}/docs.jsonl", "{out}", "--vocab-size", "500"], "text column 'text' is not in source"),
        (["tokenizer", "train", "python-help", "{out}", "--vocab-size", "5"], "invalid vocab-size (got 5)"),
    ],
)
def test_cli_text_bad_input(dask_cluster, tmp_path, args, message):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    (tmp_path / "fake.json").write_text("not json at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    out = tmp_path / "out"
    proc = run_cli(*[a.format(t=tmp_path, out=out) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in " ".join(proc.stderr.split())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr  # the message is one line
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()

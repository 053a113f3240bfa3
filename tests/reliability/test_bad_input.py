"""4. Bad input: across every flow, the CLI and the online server, a user's mistake gets a
clear message naming the value, a non-zero exit or a 4xx, no traceback, and nothing
half-written."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.images import local_writer, write_image_folder
from tests.reliability.helpers import assert_user_error
from tests.reliability.results import scenario

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]
SECTION = "4. Bad input"

# (id, arguments, what the error must name). {data}: a staged dataset, {ckpt}: a checkpoint,
# {out}: an output path that must not appear, {file}: an existing file that must stay as it is,
# {tmp}: a scratch folder, {port}: a port already in use.
CLI_CASES = [
    ("stage: missing source", "stage {tmp}/nope.csv {out}", ["source '{tmp}/nope.csv' does not exist"]),
    ("stage: unknown built-in", "stage digitz {out}", ["unknown built-in dataset 'digitz'"]),
    ("stage: codec", "stage digits {out} --codec brotli", ["codec", "'brotli'"]),
    ("stage: codec level", "stage digits {out} --level 99", ["level 99 is out of range for codec 'zstd'"]),
    ("stage: shard size", "stage digits {out} --shard-size -5MB", ["shard size must be greater than 0", "-5MB"]),
    ("stage: val fraction", "stage digits {out} --val-fraction 1.5", ["val-fraction", "1.5"]),
    ("stage: destination is a file", "stage digits {file}", ["destination '{file}' is an existing file"]),
    ("stage: credential as an option", "stage digits {out} --storage-option aws_secret_access_key=abc",
     ["storage option 'aws_secret_access_key' looks like a credential"]),
    ("stage: storage option syntax", "stage digits {out} --storage-option anon", ["--storage-option 'anon' is not KEY=VALUE"]),
    ("stage: pickled NumPy source", "stage {tmp}/objects.npy {out}", ["objects.npy"]),
    ("stage: empty image folder", "stage {tmp}/no-images {out} --format images",
     ["source '{tmp}/no-images' holds no image files in class folders"]),
    ("stage: truncated image", "stage {tmp}/images {out}", ["'cat/broken.jpg'", "do not decode", "--skip-bad"]),
    ("stage: decode size", "stage {tmp}/images {out} --decode 2", ["decode", "greater than or equal to 4"]),
    ("train: no dataset", "train {tmp}/nothing --checkpoint-dir {out}", ["no dataset at '{tmp}/nothing'"]),
    ("train: epochs", "train {data} --epochs 0 --checkpoint-dir {out}", ["epochs", "0"]),
    ("train: batch larger than the data", "train {data} --batch-size 100000 --checkpoint-dir {out}",
     ["fewer than one global batch"]),
    ("train: unknown model", "train {data} --model resnet9000 --checkpoint-dir {out}", ["unknown model 'resnet9000'"]),
    ("train: precision", "train {data} --precision fp8 --checkpoint-dir {out}", ["precision", "'fp8'"]),
    ("train: learning rate", "train {data} --lr -1 --checkpoint-dir {out}", ["lr", "-1"]),
    ("train: model argument", "train {data} --model-arg depth=3 --checkpoint-dir {out}", ["'mlp'", "depth"]),
    ("train: feature column", "train {data} --feature-column pixels --checkpoint-dir {out}", ["'pixels'"]),
    ("train: pickled init checkpoint", "train {data} --init-from {tmp}/model.pt --checkpoint-dir {out}",
     ["'{tmp}/model.pt' is not a safetensors checkpoint"]),
    ("train: world size over the cluster", "train {data} --world-size 3 --checkpoint-dir {out}",
     ["world size 3 is larger than the cluster"]),
    ("optimize: no step", "optimize {ckpt} --eval {data} --output {out}", ["nothing to do"]),
    ("optimize: prune amount", "optimize {ckpt} --eval {data} --output {out} --prune 1.5", ["prune", "1.5"]),
    ("optimize: quantize mode", "optimize {ckpt} --eval {data} --output {out} --quantize int4", ["'int4'"]),
    ("optimize: no checkpoint", "optimize {tmp}/none --eval {data} --output {out} --quantize int8-dynamic",
     ["no checkpoint at '{tmp}/none'"]),
    ("optimize: no eval dataset", "optimize {ckpt} --eval {tmp}/nothing --output {out} --quantize int8-dynamic",
     ["no dataset at '{tmp}/nothing'"]),
    ("infer: output is a file", "infer {ckpt} {data} {file}", ["output '{file}' is an existing file"]),
    ("infer: batch size", "infer {ckpt} {data} {out} --max-batch-size 0", ["max-batch-size", "0"]),
    ("infer: split", "infer {ckpt} {data} {out} --split test", ["split 'test' is not in dataset '{data}'"]),
    ("infer: no model", "infer {tmp}/none {data} {out}", ["no checkpoint at '{tmp}/none'"]),
    ("infer: kernel", "infer {ckpt} {data} {out} --kernel fast", ["kernel", "'fast'", "'auto' or 'eager'"]),
    ("infer: unknown kept column", "infer {ckpt} {data} {out} --keep-columns id,nope", ["--keep-columns 'id', 'nope'"]),
    ("train: unknown feature column", "train {table} --feature-columns alcohol,nope* --checkpoint-dir {out}",
     ["feature column 'nope*' matches no column"]),
    ("train: regression on string labels", "train {table} --task regression --checkpoint-dir {out}",
     ["--task regression needs a numeric label; column 'label' is string"]),
    ("train: unreachable storage", "train s3://lake/wine --storage-option endpoint_url=http://127.0.0.1:9 "
     "--checkpoint-dir {out}", ["cannot reach the storage of 's3://lake/wine'"]),
    ("lifecycle: source", "lifecycle --source digitz --output {out}", ["unknown built-in dataset 'digitz'"]),
    ("lifecycle: epochs", "lifecycle --epochs 0 --output {out}", ["epochs", "0"]),
    ("lifecycle: world size", "lifecycle --world-size 0 --output {out}", ["world-size", "0"]),
    ("serve: no model", "serve {tmp}/none --port 0", ["no checkpoint at '{tmp}/none'"]),
    ("serve: port", "serve {ckpt} --port 70000", ["port", "70000"]),
    ("serve: limits", "serve {ckpt} --max-request-rows 2000 --max-queue-rows 100",
     ["max_request_rows (2000) must not exceed max_queue_rows (100)"]),
    ("serve: replicas", "serve {ckpt} --replicas 0", ["replicas", "0"]),
    ("serve: kernel", "serve {ckpt} --kernel fast", ["kernel", "'fast'", "'auto' or 'eager'"]),
    ("serve: port in use", "serve {ckpt} --port {port}", ["cannot listen on 127.0.0.1:{port}"]),
    ("unknown command", "frobnicate", ["No such command 'frobnicate'"]),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, digits_dataset, digits_checkpoint):
    import torch

    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "file").write_text("keep me")
    np.save(tmp / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    torch.save({"w": torch.ones(2)}, tmp / "model.pt")
    (tmp / "no-images" / "cat").mkdir(parents=True)
    write_image_folder(local_writer(tmp / "images"), per_class=2)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    from tests.byod_tables import wine_table, write
    from tests.conftest import stage_plain

    stage_plain(source=write(wine_table(), tmp / "wine", "csv"), dest=str(tmp / "wine-ds"))
    yield {"tmp": str(tmp), "data": digits_dataset, "ckpt": digits_checkpoint, "file": str(tmp / "file"),
           "table": str(tmp / "wine-ds"),
           "port": str(busy.getsockname()[1])}
    busy.close()


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli(case, places, dask_cluster, tmp_path):
    sc = scenario(SECTION, "`swarm` command line: exit 2, one line naming the value, nothing written")
    label, args, needles = case
    with sc.trial(label, reraise=True):
        values = {**places, "out": str(tmp_path / "out")}
        proc = run_cli(*[a.format(**values) for a in args.split()], timeout=180)
        assert_user_error(proc, *[n.format(**values) for n in needles])
        assert not (tmp_path / "out").exists(), "something was written"
        assert Path(places["file"]).read_text() == "keep me"
    if len(CLI_CASES) == sc.trials:
        sc.note(f"{len(CLI_CASES)} mistakes over stage, train, optimize, infer, lifecycle and serve, each run as "
                "`swarm …` in a subprocess: exit status 2, the message names the bad value, no traceback on "
                "stdout or stderr, the output path never created and an existing file untouched")


# --------------------------------------------------------------------------- the online server

PAYLOADS = [
    ("not JSON", b"{inputs: [[1, 2]]", 400, "the body is not JSON"),
    ("an array, not an object", b"[[1, 2]]", 400, "not an object"),
    ("unknown field", b'{"rows": [[1]]}', 400, "unknown field(s) 'rows'"),
    ("no inputs", b'{"probabilities": true}', 400, 'no "inputs" field'),
    ("empty inputs", b'{"inputs": []}', 400, "got an empty list"),
    ("a single row, not a list of rows", b'{"inputs": [1, 2, 3]}', 400, "got a single row"),
    ("rows of the wrong width", b'{"inputs": [[1, 2, 3]]}', 400, "got rows of shape [3]"),
    ("ragged rows", json.dumps({"inputs": [[1] * 64, [1] * 63]}).encode(), 400, "ragged"),
    ("strings", json.dumps({"inputs": [["a"] * 64]}).encode(), 400, "numbers only (got strings)"),
    ("nulls", json.dumps({"inputs": [[None] * 64]}).encode(), 400, "numbers only"),
    ("NaN", b'{"inputs": [[NaN' + b", 1" * 63 + b"]]}", 400, "not JSON"),
    ("beyond float32", b'{"inputs": [[1e39' + b", 1" * 63 + b"]]}", 400, "too large for float32"),
    ("probabilities not a boolean", json.dumps({"inputs": [[1] * 64], "probabilities": "yes"}).encode(), 400,
     "true or false"),
    ("nested 10,000 deep", b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "not JSON"),
    ("too many rows", json.dumps({"inputs": [[1] * 64] * 17}).encode(), 413, "17 rows; at most 16"),
]


@pytest.fixture(scope="module")
def server(digits_checkpoint):
    from tasks.inference.config import ServeConfig
    from tasks.inference.server import BackgroundServer

    with BackgroundServer(ServeConfig(model=digits_checkpoint, port=0, max_request_rows=16,
                                      max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.mark.parametrize("case", PAYLOADS, ids=[c[0] for c in PAYLOADS])
def test_server(case, server, caplog):
    sc = scenario(SECTION, "Online server: 4xx naming the problem, server unharmed")
    label, body, status, message = case
    with sc.trial(label, reraise=True), caplog.at_level(logging.WARNING):
        response = httpx.post(f"{server.url}/predict", content=body, timeout=30)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "the server logged an error"
        ok = httpx.post(f"{server.url}/predict", json={"inputs": [[0.5] * 64]}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
    if len(PAYLOADS) == sc.trials:
        sc.note(f"{len(PAYLOADS)} bad request bodies to POST /predict (the size limits are in section 5): the "
                "status, an error naming the problem, nothing logged at ERROR, and a good request answered after")


# --------------------------------------------------------------------------- flows from Python and Prefect

def _flow_cases(data: str, ckpt: str, out: str) -> list:
    from flows.infer import batch_inference
    from flows.lifecycle import lifecycle
    from flows.optimize import optimize_model
    from flows.stage import stage_dataset
    from flows.train import train_model

    return [
        ("stage_dataset: codec", stage_dataset, {"config": {"source": "digits", "dest": out, "codec": "brotli"}},
         ["codec", "brotli"]),
        ("train_model: epochs", train_model, {"config": {"dataset": data, "checkpoint_dir": out, "epochs": -3}},
         ["epochs", "-3"]),
        ("optimize_model: prune", optimize_model, {"config": {"checkpoint": ckpt, "eval_dataset": data,
                                                              "output": out, "prune": 7}}, ["prune", "7"]),
        ("batch_inference: unknown option", batch_inference,
         {"config": {"model": ckpt, "dataset": data, "output": out, "batch": 5}}, ["batch"]),
        ("lifecycle: shard size", lifecycle, {"data": {"shard_size": "huge"}, "output": out}, ["shard_size", "huge"]),
    ]


def test_flow_parameters(places, dask_cluster, tmp_path):
    """What a deployment run from the UI's form, or a Python call, does with bad parameters."""
    sc = scenario(SECTION, "Flow parameters (Python calls, as the Prefect UI sends them): refused by name")
    out = str(tmp_path / "out")
    for label, flow, params, needles in _flow_cases(places["data"], places["ckpt"], out):
        with sc.trial(label):
            with pytest.raises(Exception) as caught:
                flow(**params)
            text = str(caught.value)
            assert all(n in text for n in needles), f"{needles} not in {text!r}"
            assert "Traceback" not in text and not Path(out).exists()
    sc.note("each flow called with parameters as JSON-like dicts (what a deployment run from the UI's form "
            "carries): the run is refused before any work, the error names the field and the value")
    sc.check()

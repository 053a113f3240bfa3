"""5. Security: no pickle deserialization anywhere, manifest entries that leave the dataset
root refused, storage credentials never in logs, artifacts, errors or the parameters the
Prefect UI shows, and request size limits on the server."""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from storage.errors import SwarmError
from storage.hashing import digest_bytes, sealed_json
from tests.conftest import ROOT, run_cli, stage_plain
from tests.reliability.helpers import assert_user_error, swarm
from tests.reliability.results import scenario

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]
SECTION = "5. Security"
PROJECT = ("storage", "tasks", "flows", "deployments", "benchmarks")


# --------------------------------------------------------------------------- no pickles

UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "loads"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"),
              ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("marshal", "loads"),
              ("shelve", "open"), ("yaml", "unsafe_load"), ("jsonpickle", "decode")}


def _deserializers(path: Path) -> list[str]:
    """Calls in ``path`` that can run code while loading data."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in {m for m, _ in UNPICKLERS}:
            found += [f"{path}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                      if (node.module, a.name) in UNPICKLERS]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        owner, name = node.func.value.id, node.func.attr
        keywords = {k.arg: k.value for k in node.keywords}
        constant = lambda key: getattr(keywords.get(key), "value", None)  # noqa: E731
        if (owner, name) in UNPICKLERS:
            found.append(f"{path}:{node.lineno} {owner}.{name}")
        elif (owner, name) == ("torch", "load") and constant("weights_only") is not True:
            found.append(f"{path}:{node.lineno} torch.load without weights_only=True")
        elif name == "load" and owner in ("np", "numpy") and constant("allow_pickle") is True:
            found.append(f"{path}:{node.lineno} numpy.load(allow_pickle=True)")
        elif (owner, name) == ("yaml", "load") and "Safe" not in ast.unparse(keywords.get("Loader", ast.Constant(""))):
            found.append(f"{path}:{node.lineno} yaml.load without a safe Loader")
    return found


class _Touch:
    """Unpickling it creates a file: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def trap(tmp_path):
    sentinel = tmp_path / "pickle-was-loaded"
    yield sentinel, pickle.dumps(_Touch(sentinel))
    assert not sentinel.exists(), "a pickle was deserialized"


def test_no_pickle_is_ever_deserialized(trap, digits_checkpoint, digits_dataset, dask_cluster, tmp_path):
    sc = scenario(SECTION, "No pickle deserialization: a static scan, and pickles offered as inputs")
    sentinel, payload = trap
    with sc.trial("static scan of the project's code"):
        files = [p for d in PROJECT for p in sorted((ROOT / d).rglob("*.py"))]
        found = [f for p in files for f in _deserializers(p)]
        assert not found, "\n".join(found)
    (tmp_path / "model.pt").write_bytes(payload)
    for command in (["serve", "{pt}", "--port", "0"], ["infer", "{pt}", digits_dataset, "{out}"],
                    ["optimize", "{pt}", "--eval", digits_dataset, "--output", "{out}", "--quantize", "int8-dynamic"],
                    ["train", digits_dataset, "--init-from", "{pt}", "--checkpoint-dir", "{out}"]):
        with sc.trial(f"swarm {command[0]} given a pickled .pt"):
            proc = run_cli(*[a.format(pt=tmp_path / "model.pt", out=tmp_path / "out") for a in command])
            assert_user_error(proc, "is not a safetensors checkpoint")
            assert not sentinel.exists()
    with sc.trial("a pickle posing as tensors.safetensors, with matching metadata"):
        folder = tmp_path / "crafted" / "ckpt-000000001"
        shutil.copytree(digits_checkpoint, folder)
        (folder / ckpt.TENSORS).write_bytes(payload)
        meta = json.loads((folder / ckpt.META).read_text())
        meta.update(tensors_hash=digest_bytes(payload), tensors_bytes=len(payload))
        (folder / ckpt.META).write_bytes(sealed_json(meta))
        with pytest.raises(SwarmError, match="is not a valid safetensors file"):
            ckpt.load(str(folder))
        proc = run_cli("infer", str(folder), digits_dataset, str(tmp_path / "out"))
        assert_user_error(proc, "is not a valid safetensors file")
    with sc.trial("a checkpoint naming os:system as its model factory"):
        folder = tmp_path / "factory" / "ckpt-000000001"
        shutil.copytree(digits_checkpoint, folder)
        meta = json.loads((folder / ckpt.META).read_text())
        meta["model"] = {"name": "os:system", "args": {"command": f"touch {sentinel}"}}
        (folder / ckpt.META).write_bytes(sealed_json(meta))
        proc = run_cli("serve", str(folder), "--port", "0")
        assert_user_error(proc, "names model factory 'os:system', which is not a built-in")
    with sc.trial("a NumPy source holding pickled objects"):
        np.save(tmp_path / "objects.npy", np.array([_Touch(sentinel)], dtype=object), allow_pickle=True)
        with pytest.raises(SwarmError, match="objects.npy"):
            stage_plain(source=str(tmp_path / "objects.npy"), dest=str(tmp_path / "npy-out"))
    with sc.trial("a Parquet source with a pickled Arrow extension type"):
        field = pa.field("x", pa.int64(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                    b"ARROW:extension:metadata": payload})
        pq.write_table(pa.table({"x": [1, 2, 3]}, schema=pa.schema([field])), tmp_path / "ext.parquet")
        stage_plain(source=str(tmp_path / "ext.parquet"), dest=str(tmp_path / "ext-out"))
        assert Dataset.open(str(tmp_path / "ext-out")).read_table().column("x").to_pylist() == [1, 2, 3]
    sc.note("an AST scan of storage/, tasks/, flows/, deployments/ and benchmarks/ for pickle, cloudpickle, dill, "
            "joblib, marshal, shelve and unsafe YAML loads, torch.load without weights_only=True and numpy.load "
            "with allow_pickle=True; then payloads whose unpickling would create a file, offered as a .pt "
            "checkpoint to four commands, as tensors.safetensors with matching metadata, as pickled NumPy objects "
            "and as a pickled Arrow extension type; plus a checkpoint naming os:system as its model factory. "
            "The file never appeared. (Dask pickles its own messages between this project's processes; that is "
            "the cluster's transport, not data read from storage)")
    sc.check()


# --------------------------------------------------------------------------- the dataset root


def _craft(root: Path, name: str) -> None:
    """Point the first shard entry of ``root``'s manifest at ``name`` (checksum recomputed)."""
    doc = json.loads((root / "index.json").read_text())
    doc["shards"][0]["name"] = name
    (root / "index.json").write_bytes(sealed_json(doc))


def test_manifest_entries_that_leave_the_root_are_refused(dask_cluster, tmp_path):
    from storage.loader import StreamingDataset

    sc = scenario(SECTION, "Manifest entries leaving the dataset root (.., absolute, URLs, symlinks): refused")
    base = tmp_path / "base"
    stage_plain(source="digits", dest=str(base), val_fraction=0.2, shard_size="64KB")
    secret = tmp_path / "secret.arrow"
    first = Dataset.open(str(base)).shards("train")[0]
    shutil.copy(base / first.name, secret)  # a file outside the root, even with the right bytes
    cases = ["../secret.arrow", "train/../../secret.arrow", str(secret), "file:///etc/passwd",
             "s3://other-bucket/x.arrow", "train\\..\\..\\secret.arrow", "C:/secret.arrow"]
    for i, name in enumerate(cases):
        with sc.trial(f"name {name!r}"):
            root = tmp_path / f"name-{i}"
            shutil.copytree(base, root)
            _craft(root, name)
            with pytest.raises(SwarmError, match="relative path|leaves the dataset root"):
                Dataset.open(str(root))
    readers = {
        "Dataset.read_table": lambda r: Dataset.open(str(r)).read_table(),
        "training loader": lambda r: list(StreamingDataset(str(r), batch_size=64)),
        "shard cache over local files": lambda r: Dataset.open(
            f"shardcache::{r}", {"cache_dir": str(tmp_path / "cache"), "skip_instance_cache": True}).read_table(),
    }
    for label, read in readers.items():
        with sc.trial(f"symlinked shard, {label}"):
            root = tmp_path / f"link-{label.split()[0]}"
            shutil.copytree(base, root)
            (root / first.name).unlink()
            os.symlink(secret, root / first.name)
            with pytest.raises(SwarmError, match="outside the dataset root"):
                read(root)
    with sc.trial("symlinked split folder, swarm train"):
        root = tmp_path / "link-folder"
        shutil.copytree(base, root)
        outside = tmp_path / "outside-train"
        shutil.move(root / "train", outside)
        os.symlink(outside, root / "train")
        proc = run_cli("train", str(root), "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck"))
        assert_user_error(proc, "outside the dataset root")
    sc.note("crafted manifests (checksum recomputed, as an attacker would) naming parent, absolute, URL, "
            "backslash and drive-letter paths are refused when the manifest is read; a shard or a split folder "
            "replaced by a symlink to a file outside (with the very bytes the manifest expects) is refused by the "
            "reader, the training loader, the shard cache over local files and `swarm train`")
    sc.check()


# --------------------------------------------------------------------------- credentials

SENTINEL_KEY = "AKIASENTINEL7Q3XKEY0"
SENTINEL_SECRET = "sentinel-SECRET-d41d8cd98f00b204e9800998ecf8427e"
SENTINELS = ("SENTINEL7Q3X", "sentinel-SECRET-d41d8cd9")


def _leaks(text: str) -> list[str]:
    return [s for s in SENTINELS if s in text]


def _run_records(flow_run_ids) -> str:
    """Everything the Prefect API holds about these flow runs and their subflows: parameters,
    state messages, task runs, artifacts and logs, as one text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId,
        LogFilter, LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        ids, frontier = list(flow_run_ids), list(flow_run_ids)
        while frontier:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children]
            ids += frontier
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        more = logs
        while len(more) == 200:
            more = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200,
                                    offset=len(logs))
            logs += more
    parts = [r.model_dump_json() for r in runs] + [t.model_dump_json() for t in tasks]
    parts += [a.model_dump_json() for a in arts] + [log.message for log in logs]
    assert runs and logs, "nothing was recorded for these runs"
    return "\n".join(parts)


@pytest.fixture
def secret_block(prefect_api):
    from prefect.blocks.system import Secret

    Secret(value=json.dumps({"key": SENTINEL_KEY, "secret": SENTINEL_SECRET})).save("reliability-s3", overwrite=True)
    return "reliability-s3"


def test_credentials_never_leak(dask_cluster, s3, bucket, secret_block, digits_checkpoint, tmp_path, caplog):
    from distributed import Client

    from flows.infer import batch_inference
    from flows.optimize import optimize_model
    from flows.stage import stage_dataset
    from flows.train import train_model
    from tasks.inference.offline import InferConfig
    from tasks.optimize import OptimizeConfig
    from tasks.staging import StageConfig
    from tasks.training import TrainConfig

    sc = scenario(SECTION, "Storage credentials never in logs, artifacts, errors or Prefect parameters")
    options = {"endpoint_url": s3.endpoint, "credentials_block": secret_block}
    root = f"s3://{bucket}"
    caplog.set_level(logging.DEBUG)  # everything any library logs, DEBUG included
    run_ids, errors = [], []
    with sc.trial("every flow on S3 with credentials from a Prefect Secret block"):
        state = stage_dataset(StageConfig(source="digits", dest=f"{root}/digits", val_fraction=0.2,
                                          storage_options=options), return_state=True)
        run_ids.append(state.state_details.flow_run_id)
        staged = state.result()
        state = train_model(TrainConfig(dataset=staged.dest, checkpoint_dir=f"{root}/ck", epochs=2,
                                        storage_options=options), return_state=True)
        run_ids.append(state.state_details.flow_run_id)
        state = optimize_model(OptimizeConfig(checkpoint=state.result().checkpoint, eval_dataset=staged.dest,
                                              output=f"{root}/model", quantize="int8-dynamic", storage_options=options),
                               return_state=True)
        run_ids.append(state.state_details.flow_run_id)
        state = batch_inference(InferConfig(model=state.result().output, dataset=staged.dest, output=f"{root}/pred",
                                            storage_options=options), return_state=True)
        run_ids.append(state.state_details.flow_run_id)
        state.result()
    failing = [
        ("staging to a missing bucket", lambda: stage_dataset(
            StageConfig(source="digits", dest="s3://no-such-bucket-x/d", storage_options=options))),
        ("training on a missing dataset", lambda: train_model(
            TrainConfig(dataset=f"{root}/nothing", checkpoint_dir=f"{root}/ck2", storage_options=options))),
        ("inference of a missing model", lambda: batch_inference(
            InferConfig(model=f"{root}/no-model", dataset=f"{root}/digits", output=f"{root}/p2",
                        storage_options=options))),
        ("a missing credentials block", lambda: stage_dataset(
            StageConfig(source="digits", dest=f"{root}/d3", storage_options={**options, "credentials_block": "nope"}))),
    ]
    for label, call in failing:
        with sc.trial(f"error: {label}"):
            with pytest.raises(Exception) as caught:
                call()
            errors.append(f"{type(caught.value).__name__}: {caught.value}")
            assert not _leaks(errors[-1]), errors[-1]
    with sc.trial("the Prefect API: parameters, states, task runs, artifacts, logs of those runs"):
        assert not _leaks(_run_records(run_ids))
    with sc.trial("this process's log records and the Dask workers' logs"):
        # botocore's DEBUG request dumps (off unless asked for) show the access key id, as the
        # Authorization header carries it; the secret key never appears, at any level.
        shown = [r for r in caplog.records if r.levelno >= logging.INFO or not r.name.startswith(("botocore", "aiobotocore"))]
        assert not _leaks("\n".join(r.getMessage() for r in shown))
        assert SENTINELS[1] not in "\n".join(r.getMessage() for r in caplog.records)
        with Client(dask_cluster.scheduler_address) as client:
            worker_logs = json.dumps(client.get_worker_logs(n=10_000), default=str)
        assert not _leaks(worker_logs)
    with sc.trial("credentials inside a URL parameter: refused without echoing them"):
        url = f"s3://{SENTINEL_KEY}:{SENTINEL_SECRET}@{bucket}/digits"
        proc = run_cli("stage", "digits", url, "--storage-option", f"endpoint_url={s3.endpoint}")
        assert_user_error(proc, "dest carries credentials in its URL")
        assert not _leaks(proc.stdout + proc.stderr)
        with pytest.raises(Exception, match="dest carries credentials in its URL") as caught:
            stage_dataset(config={"source": "digits", "dest": url})
        assert not _leaks(str(caught.value))
    env = {"AWS_ACCESS_KEY_ID": SENTINEL_KEY, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET}
    for label, args, debug in [
        ("swarm stage, credentials in the environment", ["stage", "digits", f"{root}/env-digits"], False),
        ("swarm stage to a missing bucket, SWARM_DEBUG=1 (tracebacks)", ["stage", "digits", "s3://no-such-b/x"], True),
        ("swarm infer of a missing model, SWARM_DEBUG=1", ["infer", f"{root}/none", f"{root}/digits", f"{root}/p"],
         True),
    ]:
        with sc.trial(label):
            proc = swarm(*args, "--storage-option", f"endpoint_url={s3.endpoint}", own_cluster=True,
                         env={**env, **({"SWARM_DEBUG": "1"} if debug else {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate(timeout=300)
            assert (proc.returncode == 0) != debug, err[-2000:]
            assert not _leaks(out + err), (out + err)[-3000:]
    sc.note("a Prefect Secret block holding sentinel credentials, named by the storage option credentials_block; "
            "stage, train, optimize and infer on S3 with it, and four failing calls; then the sentinels searched "
            "for in every error message, in the runs' parameters, states, task runs, artifacts and logs read back "
            "from the Prefect API, in this process's log records at every level (the access key id shows only in "
            "botocore's own DEBUG request dumps, which carry the Authorization header; the secret key nowhere) and in "
            "the Dask workers' logs; and `swarm` "
            "commands with sentinel AWS_* variables (their own cluster inheriting them), failing ones with "
            "SWARM_DEBUG=1 tracebacks, searched on stdout and stderr; a URL parameter carrying user:password@ is "
            "refused without echoing it")
    sc.check()


# --------------------------------------------------------------------------- the server's limits


def test_request_size_limits(digits_checkpoint):
    from tasks.inference.config import ServeConfig
    from tasks.inference.server import BackgroundServer

    sc = scenario(SECTION, "Server request limits: oversized bodies, rows and headers refused, server unharmed")
    limit = 64 * 1024
    row = json.dumps([0.25] * 64)
    with BackgroundServer(ServeConfig(model=digits_checkpoint, port=0, max_request_rows=16, max_body_bytes=limit,
                                      max_queue_rows=64)) as server:
        url = f"{server.url}/predict"

        def body_of(size: int) -> bytes:
            doc = ('{"inputs": [' + row + "]}").encode()
            return doc[:-1] + b" " * (size - len(doc)) + b"}"

        def healthy() -> None:
            assert httpx.post(url, json={"inputs": [[0.5] * 64]}, timeout=30).status_code == 200

        cases = {
            "a body of exactly the limit is served": (lambda: httpx.post(url, content=body_of(limit)), 200, None),
            "a body one byte over (Content-Length)": (lambda: httpx.post(url, content=body_of(limit + 1)), 413,
                                                       "at most 65,536"),
            "a 50 MB body declared up front": (lambda: httpx.post(url, content=b"{" + b" " * (50 << 20) + b"}"),
                                               413, "at most 65,536"),
            "a chunked body without Content-Length": (
                lambda: httpx.post(url, content=(b" " * 4096 for _ in range(100))), 413, "over 65,536 bytes"),
            "17 rows where 16 are allowed": (
                lambda: httpx.post(url, content=('{"inputs": [' + ",".join([row] * 17) + "]}").encode()), 413,
                "17 rows; at most 16"),
            "a 1 MB header": (lambda: httpx.post(url, json={"inputs": [[0.5] * 64]},
                                                 headers={"X-Pad": "a" * 1_000_000}), 400, None),
        }
        for label, (send, status, message) in cases.items():
            with sc.trial(label):
                try:
                    response = send()
                except httpx.TransportError:  # the server may close the connection on the oversized part
                    response = None
                if status == 400:  # the HTTP layer refuses it: 4xx, or the connection closed
                    assert response is None or 400 <= response.status_code < 500, response.status_code
                else:
                    assert response is not None and response.status_code == status, getattr(response, "text", None)
                    if message:
                        assert message in response.json()["error"]
                healthy()
    sc.note(f"`swarm serve` limits (--max-body-bytes {limit:,}, --max-request-rows 16): a body at the limit "
            "served, one byte over refused with 413 whether declared by Content-Length or streamed in chunks (the "
            "server stops reading), too many rows 413, a 1 MB header refused by the HTTP layer (request heads are "
            "bounded at 16 KiB: 431); after each, a good request is answered")
    sc.check()

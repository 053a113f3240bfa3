"""Online serving over real HTTP on loopback: a trained digits model behind the batching server."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from tasks.inference.config import ServeConfig
from tasks.inference.inputs import InputSpec
from tasks.inference.server import BackgroundServer
from tasks.models.loading import load_model
from tasks.training import TrainConfig, prepare_training
from tasks.training.data import load_split
from tasks.training.rank import RankJob, train_rank
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def checkpoint(digits_dataset, tmp_path_factory) -> str:
    cfg = TrainConfig(dataset=digits_dataset, epochs=3, checkpoint_dir=str(tmp_path_factory.mktemp("serve") / "ck"))
    plan = prepare_training(cfg)
    return train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns)).checkpoint


@pytest.fixture(scope="module")
def val_rows(checkpoint, digits_dataset):
    """Validation rows as a client sends them, and the model's output for each row alone."""
    loaded = load_model(checkpoint)
    spec = InputSpec.from_checkpoint(loaded.name, loaded.args, loaded.columns)
    x, _ = load_split(digits_dataset, "val", spec.columns)
    with torch.no_grad():
        alone = [torch.softmax(loaded.model(spec.to_tensor(x[i:i + 1])), -1)[0].numpy() for i in range(len(x))]
    return x, np.stack(alone)


MODES = ["in-process", "cluster"]


def mode_options(request, mode: str) -> dict:
    """ServeConfig options for thread replicas in the test process, or replicas on the
    session's Dask worker processes behind the router."""
    if mode == "in-process":
        return {"in_process": True}
    request.getfixturevalue("dask_cluster")  # sets SWARM_DASK_ADDRESS
    return {"in_process": False, "probe_interval_s": 0.5}


@pytest.fixture(scope="module", params=MODES)
def server(checkpoint, request):
    with BackgroundServer(ServeConfig(model=checkpoint, port=0, replicas=2, max_batch_size=16, max_wait_ms=5,
                                      max_request_rows=32, max_body_bytes=64 * 1024,
                                      **mode_options(request, request.param))) as srv:
        yield srv


async def post_all(url: str, bodies: list, concurrency: int = 64) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        return await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("mode, replicas", [("in-process", 2), ("cluster", 1), ("cluster", 2), ("cluster", 4)])
def test_batched_answers_equal_the_model_on_each_row_alone(checkpoint, val_rows, request, mode, replicas):
    x, alone = val_rows
    # Batches close when full (a long wait), so under this load many requests share each batch.
    config = ServeConfig(model=checkpoint, port=0, replicas=replicas, max_batch_size=16, max_wait_ms=1000,
                         **mode_options(request, mode))
    singles = [{"inputs": x[i:i + 1].tolist(), "probabilities": True} for i in range(len(x))]
    triples = [{"inputs": x[i:i + 3].reshape(3, 1, 8, 8).tolist(), "probabilities": True}  # nested rows too
               for i in range(0, 60, 3)]
    with BackgroundServer(config) as srv:
        responses = asyncio.run(post_all(srv.url, singles + triples, concurrency=48))
        text = httpx.get(f"{srv.url}/metrics").text
        health = httpx.get(f"{srv.url}/health")
    assert [r.status_code for r in responses] == [200] * len(responses)
    docs = [r.json() for r in responses]
    got = np.array([d["probabilities"][0] for d in docs[:len(x)]])
    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-6)
    assert [d["predictions"][0] for d in docs[:len(x)]] == alone.argmax(1).tolist()
    for i, doc in zip(range(0, 60, 3), docs[len(x):]):
        assert doc["predictions"] == alone[i:i + 3].argmax(1).tolist()
        np.testing.assert_allclose(doc["probabilities"], alone[i:i + 3], rtol=1e-4, atol=1e-6)
    assert docs[0]["model"] == "mlp"
    requests, batches = len(responses), metric(text, "swarm_serve_batch_size_count")
    assert metric(text, "swarm_serve_batch_size_sum") == len(x) + 60
    assert batches < requests / 2, "requests were batched"
    for replica in range(replicas):
        assert metric(text, f'swarm_serve_replica_batches_total{{replica="{replica}"}}') > 0, "every replica served"
    assert metric(text, "swarm_serve_requests_total") == requests
    assert health.status_code == 200
    assert any(r["tried"] for r in health.json()["batch_sizes"]), "the adaptive batch size reports its trials"
    if mode == "cluster":
        placement = health.json()["placement"]
        assert [p["state"] for p in placement] == ["up"] * replicas
        workers = [p["worker"] for p in placement]
        assert len(set(workers)) == min(replicas, 2), f"replicas spread over the cluster's 2 workers: {workers}"
        assert all(p["pid"] != os.getpid() for p in placement), "replicas run in worker processes"


TOO_BIG = json.dumps({"inputs": [[0.5] * 64] * 300}).encode()  # 413 by size before its rows are counted


@pytest.mark.parametrize("body, code, message", [
    (b"not json", 400, "not JSON"),
    (b"[[1, 2]]", 400, "not an object"),
    (b'{"rows": [[1]]}', 400, "unknown field(s) 'rows'"),
    (b'{"probabilities": true}', 400, 'no "inputs" field'),
    (b'{"inputs": "0 1 2"}', 400, "must be a non-empty list of rows"),
    (b'{"inputs": []}', 400, "got an empty list"),
    (b'{"inputs": [1, 2, 3]}', 400, "got a single row"),
    (b'{"inputs": [[1, 2, 3]]}', 400, "got rows of shape [3]"),
    (json.dumps({"inputs": [[1] * 64, [1] * 63]}).encode(), 400, "ragged"),
    (json.dumps({"inputs": [["a"] * 64]}).encode(), 400, "numbers only (got strings)"),
    (json.dumps({"inputs": [[None] * 64]}).encode(), 400, "numbers only"),
    (json.dumps({"inputs": [[1] * 64], "probabilities": "yes"}).encode(), 400, "true or false"),
    (b'{"inputs": [[NaN' + b", 1" * 63 + b"]]}", 400, "not JSON"),  # NaN is not JSON
    (b'{"inputs": [[1e39' + b", 1" * 63 + b"]]}", 400, "too large for float32"),
    (json.dumps({"inputs": [[1] * 64] * 33}).encode(), 413, "33 rows; at most 32"),
    (TOO_BIG, 413, "at most 65,536"),
])
def test_bad_payloads_get_4xx_with_a_message(server, body, code, message):
    response = httpx.post(f"{server.url}/predict", content=body, timeout=30)
    assert response.status_code == code
    assert message in response.json()["error"]


def test_request_heads_are_bounded(server):
    from tasks.inference.server import MAX_HEAD_BYTES

    ok = httpx.post(f"{server.url}/predict", json={"inputs": [[0.0] * 64]},
                    headers={"X-Pad": "a" * (MAX_HEAD_BYTES // 2)}, timeout=30)
    assert ok.status_code == 200
    try:
        refused = httpx.post(f"{server.url}/predict", json={"inputs": [[0.0] * 64]},
                             headers={"X-Pad": "a" * (4 * MAX_HEAD_BYTES)}, timeout=30)
    except httpx.TransportError:  # closed while the client was still sending its head
        refused = None
    if refused is not None:
        assert refused.status_code == 431 and f"over {MAX_HEAD_BYTES:,} bytes" in refused.text
    assert httpx.post(f"{server.url}/predict", json={"inputs": [[0.0] * 64]}).status_code == 200


def test_oversize_body_without_content_length_is_refused(server):
    def chunks():
        for _ in range(100):
            yield b" " * 1024

    response = httpx.post(f"{server.url}/predict", content=chunks(), timeout=30)
    assert response.status_code == 413 and "over 65,536 bytes" in response.json()["error"]
    assert httpx.post(f"{server.url}/predict", json={"inputs": [[0.0] * 64]}).status_code == 200


def test_health_and_metrics(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "mlp" and health["replicas"] == 2
    assert health["input"] == {"width": 64, "shape": [1, 8, 8], "scale": None}
    text = httpx.get(f"{server.url}/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    for name in ("swarm_serve_requests_total", "swarm_serve_request_latency_seconds_bucket", "swarm_serve_queue_rows",
                 "swarm_serve_batch_size_bucket", "swarm_serve_replica_batch_size_limit",
                 "swarm_serve_batch_compute_seconds_count"):
        assert name in text.text


@pytest.mark.parametrize("mode", MODES)
def test_full_queue_gets_429_and_stop_answers_every_accepted_request(checkpoint, val_rows, request, mode):
    x, alone = val_rows
    # Batches would wait a minute to fill: the 4 accepted rows sit in the queue until stop() drains it.
    config = ServeConfig(model=checkpoint, port=0, max_batch_size=64, max_wait_ms=60_000, max_queue_rows=4,
                         max_request_rows=4, **mode_options(request, mode))
    srv = BackgroundServer(config)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            accepted = [asyncio.create_task(client.post("/predict", json={"inputs": x[i:i + 1].tolist()}))
                        for i in range(4)]
            await _until(client, lambda h: h["queue_rows"] == 4)
            refused = await client.post("/predict", json={"inputs": x[4:5].tolist()})
            stopping = asyncio.get_running_loop().run_in_executor(None, srv.stop)
            answers = await asyncio.gather(*accepted)
            await stopping
            return refused, answers

    try:
        refused, answers = asyncio.run(scenario())
    finally:
        srv.stop()
    assert refused.status_code == 429 and "queue is full" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["predictions"][0] for a in answers] == alone[:4].argmax(1).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_memory_cap_backs_off_and_answers_correctly(checkpoint, val_rows, request, mode):
    x, alone = val_rows
    # The digits MLP needs ~1.8 KB of activations per row: the cap fits 4 rows, the first batch tries 8.
    config = ServeConfig(model=checkpoint, port=0, max_batch_size=64, max_wait_ms=1, memory_cap_mb=0.0075,
                         **mode_options(request, mode))
    with BackgroundServer(config) as srv:
        response = httpx.post(f"{srv.url}/predict", json={"inputs": x[:40].tolist()}, timeout=60)
        health = httpx.get(f"{srv.url}/health").json()
        text = httpx.get(f"{srv.url}/metrics").text
    assert response.status_code == 200
    assert response.json()["predictions"] == alone[:40].argmax(1).tolist()
    sizes = health["batch_sizes"][0]
    assert sizes["out_of_memory_at"] == [8] and sizes["size"] == 4
    assert metric(text, "swarm_serve_replica_out_of_memory_total") == 1


async def _until(client: httpx.AsyncClient, ready, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = (await client.get("/health")).json()
        if ready(health):
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"server never reached the expected state: {health}")
        await asyncio.sleep(0.02)


def test_cli_serve_drains_in_flight_requests_on_sigterm(checkpoint, val_rows):
    x, alone = val_rows
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "serve", checkpoint, "--port", "0",
         "--replicas", "2", "--max-batch-size", "64", "--max-wait-ms", "60000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://\S+", line)
        assert found, f"no URL in {line!r}; {proc.communicate(timeout=30)}"
        url = found.group(0)

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                bodies = [{"inputs": x[i:i + 1 + i % 3].tolist()} for i in range(20)]
                in_flight = [asyncio.create_task(client.post("/predict", json=b)) for b in bodies]
                await _until(client, lambda h: h["requests_in_flight"] == 20)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*in_flight)

        answers = asyncio.run(scenario())
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [a.status_code for a in answers] == [200] * 20
    for i, answer in enumerate(answers):
        assert answer.json()["predictions"] == alone[i:i + 1 + i % 3].argmax(1).tolist()
    assert proc.returncode == 0, stderr
    assert "stopped after answering 20 requests" in stdout


def test_cli_serve_bad_model_is_one_line_exit_2(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("serve", str(tmp_path / "nothing"), "--port", "0")
    assert result.returncode == 2
    assert "no checkpoint at" in result.stderr and "Traceback" not in result.stderr


def test_connections_get_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; without it answers wait ~40 ms for ACKs."""
    import socket

    from tasks.inference.server import bind

    async def main() -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=bind("127.0.0.1", 0))
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        try:
            return await asyncio.wait_for(accepted, 30)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(main()) != 0


def test_rows_become_one_dtype_per_model():
    """Whatever the JSON numbers look like, a float model gets float32 and a token model int64."""
    from tasks.inference.inputs import PayloadError

    image = InputSpec.from_checkpoint("mlp", {"in_features": 4}, {"shape": [2, 2], "scale": 0.5})
    flat_ints = image.parse([[1, 2, 3, 4]], max_rows=8)
    nested = image.parse([[[0.5, 1.5], [2.5, 3.5]]], max_rows=8)
    assert flat_ints.dtype == nested.dtype == np.float32 and flat_ints.shape == nested.shape == (1, 4)
    assert image.to_tensor(flat_ints)[0].tolist() == [0.5, 1.0, 1.5, 2.0], "the training-time scale applies"
    tokens = InputSpec.from_checkpoint("transformer", {"seq_len": 3}, {})
    assert tokens.parse([[1, 2, 3]], max_rows=8).dtype == np.int64
    with pytest.raises(PayloadError, match="integer token ids"):
        tokens.parse([[1.5, 2, 3]], max_rows=8)
    with pytest.raises(PayloadError, match="3 token ids"):
        tokens.parse([[1, 2]], max_rows=8)

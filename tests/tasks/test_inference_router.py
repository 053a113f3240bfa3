"""The router's parts without a cluster: frames, power of two choices, and retries when a
replica's host goes away (replica hosts on threads of this process, real sockets)."""

import asyncio
import time

import numpy as np
import pytest

from tasks.inference import wire
from tasks.inference.replica_host import ReplicaHost
from tasks.inference.router import ReplicaClient, Router


def test_frames_carry_arrays_exactly_and_refuse_foreign_streams():
    async def roundtrip(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await wire.read(reader)

    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([[1, 2]], dtype=np.int64),
                  np.zeros((0, 5), dtype=np.float32)):
        header, back = asyncio.run(roundtrip(wire.encode({"id": 7, "op": "predict"}, array)))
        assert header["id"] == 7 and back.dtype == array.dtype and np.array_equal(back, array)
    header, none = asyncio.run(roundtrip(wire.encode({"op": "ping", "report": {8: {"ms": 1.0}}})))
    assert none is None and header["report"] == {"8": {"ms": 1.0}}
    bad = wire.encode({"id": 1}, np.zeros(2, np.float32)).replace(b'"float32"', b'"object!"')
    with pytest.raises(wire.WireError, match="not allowed"):
        asyncio.run(roundtrip(bad))
    with pytest.raises(wire.WireError, match="not this protocol"):
        asyncio.run(roundtrip(b"GET / HTTP/1.1\r\n\r\n"))


class Doubler:
    threads = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return batch * 2

    def report(self):
        return None

    def describe(self):
        return {"device": "cpu", "kernel": "eager"}


def _client(host: ReplicaHost, index: int) -> ReplicaClient:
    return ReplicaClient(index, {"host": host.host, "port": host.port, "worker": f"w{index}"}, max_batches=2)


def test_power_of_two_choices_takes_the_less_loaded():
    router = Router(seed=0)
    replicas = [ReplicaClient(i, {"worker": f"w{i}"}, max_batches=4) for i in range(2)]
    for r in replicas:
        router.add(r)
    replicas[0].reserve(30)
    assert all(router.choose() is replicas[1] for _ in range(20))
    replicas[1].reserve(60)
    assert router.choose() is replicas[0]
    replicas[0].reported_rows = 100  # another router's batches on it, as its last answer said
    assert router.choose() is replicas[1]


class SlowDoubler(Doubler):
    def run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(1.0)
        return batch * 2


def test_a_batch_held_by_a_lost_replica_is_answered_by_another():
    hosts = [ReplicaHost(SlowDoubler(), "127.0.0.1", max_batches=2, index=0),
             ReplicaHost(Doubler(), "127.0.0.1", max_batches=2, index=1)]
    lost = []

    async def scenario():
        router = Router(wait_for_replica_s=10, seed=1)
        clients = [_client(h, i) for i, h in enumerate(hosts)]
        for c in clients:
            c.on_lost = lambda r, why: (lost.append((r.index, why)), router.remove(r))
            await c.connect()
            router.add(c)
        rows = np.arange(8, dtype=np.float32).reshape(2, 4)
        clients[0].reserve(len(rows))
        held = asyncio.ensure_future(router.run_on(clients[0], rows))
        await asyncio.sleep(0.2)  # the batch computes on replica 0
        await asyncio.get_running_loop().run_in_executor(None, hosts[0].stop)  # as if its worker died
        return await asyncio.wait_for(held, 30), router

    try:
        out, router = asyncio.run(scenario())
    finally:
        for h in hosts:
            h.stop()
    assert np.array_equal(out, np.arange(8, dtype=np.float32).reshape(2, 4) * 2)
    assert [index for index, _ in lost] == [0]
    assert router.retries == 1 and router.choices[1] == 1

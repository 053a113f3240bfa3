"""The micro-batcher and replica routing, with fake executors (no model, no HTTP)."""

import asyncio
import threading
import time

import numpy as np
import pytest

from tasks.inference.batcher import BatcherClosed, BatchPolicy, MicroBatcher, QueueFull
from tasks.inference.replicas import Replica, ReplicaPool


class FakeExecutor:
    """Doubles its rows; records batch sizes; may hold batches until ``gate`` is set."""

    def __init__(self, gate: asyncio.Event | None = None, fail_on: int | None = None):
        self.gate, self.fail_on = gate, fail_on
        self.batches: list[int] = []
        self.busy = False

    def run(self, rows):
        self.busy = True
        self.batches.append(len(rows))
        return self._run(rows)

    async def _run(self, rows):
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.fail_on is not None and self.fail_on in rows:
                raise RuntimeError("model failed")
            return rows * 2
        finally:
            self.busy = False


class FakePool:
    def __init__(self, *executors):
        self.executors = executors

    def pick(self):
        return next((e for e in self.executors if not e.busy), None)


def rows(*values):
    return np.array(values, dtype=np.float32).reshape(-1, 1)


async def _gather(batcher, requests):
    return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)


def test_batches_fill_up_to_the_size_and_answer_every_request_in_order():
    async def main():
        ex = FakeExecutor()
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=16, max_wait_s=1.0))
        batcher.start()
        requests = [rows(i) for i in range(100)] + [rows(*range(1000, 1040))]  # the last one spans batches
        results = await _gather(batcher, requests)
        await batcher.close()
        return ex, requests, results

    ex, requests, results = asyncio.run(main())
    for req, res in zip(requests, results):
        np.testing.assert_array_equal(res, req * 2)
    assert max(ex.batches) == 16 and sum(ex.batches) == 140
    assert ex.batches[:8] == [16] * 8, "while the executor is busy the next batch fills"


def test_a_lone_request_goes_after_the_wait():
    async def main():
        ex = FakeExecutor()
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=64, max_wait_s=0.01))
        batcher.start()
        out = await asyncio.wait_for(batcher.submit(rows(3)), 30)
        await batcher.close()
        return ex, out

    ex, out = asyncio.run(main())
    assert ex.batches == [1] and out[0, 0] == 6


def test_requests_within_the_wait_share_a_batch():
    async def main():
        ex = FakeExecutor()
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=4, max_wait_s=30.0))
        batcher.start()
        first = batcher.submit(rows(1))
        await asyncio.sleep(0.01)
        rest = [batcher.submit(rows(i)) for i in (2, 3, 4)]  # the 4th row fills the batch: no wait
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        await batcher.close()
        return ex, results

    ex, results = asyncio.run(main())
    assert ex.batches == [4] and [r[0, 0] for r in results] == [2, 4, 6, 8]


def test_full_queue_refuses_then_accepts_after_it_drains():
    async def main():
        gate = asyncio.Event()
        ex = FakeExecutor(gate)
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=2, max_wait_s=0, max_queue_rows=5))
        batcher.start()
        first = batcher.submit(rows(0, 1))
        await asyncio.sleep(0.01)  # the first batch is on the (held) executor
        waiting = [batcher.submit(rows(i)) for i in range(2, 7)]  # 5 rows wait
        with pytest.raises(QueueFull, match="5 rows waiting"):
            batcher.submit(rows(7))
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 30)
        late = await batcher.submit(rows(8))
        await batcher.close()
        return results, late

    results, late = asyncio.run(main())
    assert [r[:, 0].tolist() for r in results] == [[0, 2], [4], [6], [8], [10], [12]]
    assert late[0, 0] == 16


def test_close_answers_everything_without_waiting_for_deadlines():
    async def main():
        ex = FakeExecutor()
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=64, max_wait_s=3600))
        batcher.start()
        pending = [batcher.submit(rows(i)) for i in range(10)]
        await asyncio.sleep(0.01)
        await asyncio.wait_for(batcher.close(), 30)
        assert all(f.done() for f in pending)
        with pytest.raises(BatcherClosed):
            batcher.submit(rows(1))
        return [f.result()[0, 0] for f in pending]

    assert asyncio.run(main()) == [2 * i for i in range(10)]


def test_a_failing_batch_fails_only_its_requests():
    async def main():
        ex = FakeExecutor(fail_on=13)
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=2, max_wait_s=1.0))
        batcher.start()
        results = await _gather(batcher, [rows(i) for i in (10, 11, 12, 13, 14, 15)])
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert [type(r).__name__ for r in results] == ["ndarray", "ndarray", "RuntimeError", "RuntimeError",
                                                   "ndarray", "ndarray"]


def test_a_cancelled_request_does_not_disturb_the_others():
    async def main():
        gate = asyncio.Event()
        ex = FakeExecutor(gate)
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=8, max_wait_s=0))
        batcher.start()
        futures = [batcher.submit(rows(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        futures[1].cancel()
        gate.set()
        results = await asyncio.gather(futures[0], futures[2])
        await batcher.close()
        return results

    assert [r[0, 0] for r in asyncio.run(main())] == [0, 4]


def test_least_loaded_routing_over_threaded_replicas():
    """Two replicas on threads: with one busy, the next batch goes to the other."""
    threads = []

    def slow_double(x):
        threads.append(threading.current_thread().name)
        time.sleep(0.05)
        return x * 2

    pool = ReplicaPool([Replica(i, slow_double, threads=1) for i in range(2)])

    async def main():
        batcher = MicroBatcher(pool, BatchPolicy(max_batch_size=1, max_wait_s=0))
        batcher.start()
        results = await _gather(batcher, [rows(i) for i in range(6)])
        await batcher.close()
        return results

    try:
        results = asyncio.run(main())
    finally:
        pool.close()
    assert [r[0, 0] for r in results] == [0, 2, 4, 6, 8, 10]
    assert sum(r.batches for r in pool.replicas) == 6
    assert pool.replicas[1].batches >= 1, "the 2nd batch came while replica 0 was busy"
    assert sorted(set(threads)) == ["swarm-replica-0_0", "swarm-replica-1_0"]


def test_pick_prefers_fewest_rows_in_flight_then_fewest_served():
    pool = ReplicaPool([Replica(i, lambda x: x, max_in_flight=2) for i in range(3)])
    try:
        a, b, c = pool.replicas
        a.in_flight_batches, a.in_flight_rows = 1, 10
        b.in_flight_batches, b.in_flight_rows = 1, 3
        c.in_flight_batches, c.in_flight_rows = 2, 0
        assert pool.pick() is b, "c is full, b has the fewest rows in flight"
        b.in_flight_rows = 10
        a.rows, b.rows = 500, 100
        assert pool.pick() is b
        for r in pool.replicas:
            r.in_flight_batches = 2
        assert pool.pick() is None
    finally:
        pool.close()


def test_a_broken_router_fails_waiting_requests_instead_of_hanging():
    class Broken:
        def pick(self):
            raise RuntimeError("router bug")

    async def main():
        batcher = MicroBatcher(Broken(), BatchPolicy(max_batch_size=4, max_wait_s=0))
        batcher.start()
        results = await asyncio.wait_for(_gather(batcher, [rows(1), rows(2)]), 30)
        with pytest.raises(BatcherClosed):
            batcher.submit(rows(3))
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "router bug" in str(r) for r in results)



def test_rows_that_waited_out_a_batch_go_as_soon_as_it_ends():
    async def main():
        gate = asyncio.Event()
        ex = FakeExecutor(gate)
        batcher = MicroBatcher(FakePool(ex), BatchPolicy(max_batch_size=4, max_wait_s=30.0))
        batcher.start()
        first = [batcher.submit(rows(i)) for i in (1, 2, 3, 4)]  # a full batch: runs at once
        await asyncio.sleep(0.01)
        late = [batcher.submit(rows(i)) for i in (5, 6)]  # arrive while it computes
        await asyncio.sleep(0.01)
        gate.set()  # the batch ends: the two waiting rows go now, not 30 s later
        results = await asyncio.wait_for(asyncio.gather(*first, *late), 5)
        lone = batcher.submit(rows(7))  # arrives at an idle server: waits for company
        await asyncio.sleep(0.05)
        held = ex.batches[:]
        batcher.drain()
        await asyncio.wait_for(lone, 5)
        await batcher.close()
        return ex, results, held

    ex, results, held = asyncio.run(main())
    assert ex.batches == [4, 2, 1] and held == [4, 2]
    assert [r[0, 0] for r in results] == [2, 4, 6, 8, 10, 12]

"""The KV pool: allocated once, never over its budget; admission waits for free blocks (and
preempted sequences come back with the same tokens); a full queue refuses; a cancelled
request gives its blocks back at once."""

from __future__ import annotations

import threading

import pytest

from tasks.generation import Engine, QueueFull, Request, SamplingParams, runner_for_model
from tests.tasks.generation.conftest import alone, tiny_gpt


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


def test_full_pool_makes_admission_wait_never_overflows(gpt):
    engine = Engine(runner_for_model(gpt), pool_tokens=96, block_size=8, max_batch=16)
    cache_before = engine.cache.k.data_ptr(), engine.cache.nbytes
    requests = [Request([1 + i, 2, 3, 4] * 5, SamplingParams(max_new_tokens=30)) for i in range(10)]
    handles = [engine.submit(r) for r in requests]
    saw_waiting = False
    while engine.has_work:
        engine.step()
        assert engine.pool.num_used <= engine.pool.num_blocks
        assert sum(len(s.blocks) for s in engine.scheduler.running) == engine.pool.num_used
        saw_waiting |= bool(engine.scheduler.waiting) and len(engine.scheduler.running) < 10
    assert saw_waiting
    assert engine.pool.peak_used == engine.pool.num_blocks == 12    # used to the full, not beyond
    assert (engine.cache.k.data_ptr(), engine.cache.nbytes) == cache_before   # allocated once
    assert engine.stats()["preemptions"] > 0                         # decoding outgrew the pool
    for request, handle in zip(requests, handles):                  # preempted ones recomputed exactly
        assert handle.result().tokens == alone(gpt, request.prompt, request.params)
    assert engine.pool.num_used == 0


def test_pool_sized_in_bytes_reports_its_use(gpt):
    runner = runner_for_model(gpt)
    engine = Engine(runner, pool_bytes=64 * runner.bytes_per_token(), block_size=16)
    usage = engine.stats()["kv_pool"]
    assert usage["tokens_total"] == 64 and usage["blocks_total"] == 4
    assert usage["bytes_total"] == 64 * runner.bytes_per_token()
    engine.submit(Request([1] * 20, SamplingParams(max_new_tokens=4)))
    engine.step()
    assert engine.stats()["kv_pool"]["blocks_used"] == 2


def test_full_queue_refuses_with_retry_after(gpt):
    engine = Engine(runner_for_model(gpt), pool_tokens=128, block_size=8, max_waiting=2)
    for _ in range(2):
        engine.submit(Request([1, 2], SamplingParams(max_new_tokens=4)))
    with pytest.raises(QueueFull, match="queue is full") as info:
        engine.submit(Request([1, 2], SamplingParams(max_new_tokens=4)))
    assert info.value.retry_after_s > 0
    engine.step()                                    # both admitted: room again
    engine.submit(Request([1, 2], SamplingParams(max_new_tokens=4)))


def test_cancel_returns_blocks_at_once(gpt):
    engine = Engine(runner_for_model(gpt), pool_tokens=48, block_size=8)
    running = engine.submit(Request(list(range(1, 30)), SamplingParams(max_new_tokens=10)))
    waiting = engine.submit(Request(list(range(1, 30)), SamplingParams(max_new_tokens=10)))
    engine.step()
    assert engine.pool.num_used == 4 and len(engine.scheduler.waiting) == 1
    running.cancel()
    assert engine.pool.num_used == 0
    assert running.result(timeout=1).finish_reason == "cancelled"
    waiting.cancel()
    assert not engine.has_work and waiting.result(timeout=1).finish_reason == "cancelled"
    assert engine.stats()["requests_cancelled"] == 2


def test_background_loop_streams_and_drains(gpt):
    engine = Engine(runner_for_model(gpt), pool_tokens=256, block_size=8)
    engine.start()
    try:
        handle = engine.submit(Request([4, 5, 6], SamplingParams(max_new_tokens=12)))
        events = list(handle)
        assert [e.token_id for e in events[:-1]] == handle.result().tokens
        assert events[-1].finished and events[-1].finish_reason == "length"
        late = [engine.submit(Request([7, 8], SamplingParams(max_new_tokens=40))) for _ in range(3)]
        stopper = threading.Thread(target=engine.stop, kwargs={"drain": True})
        stopper.start()
        stopper.join(30)
        assert all(h.result(timeout=1).finish_reason == "length" for h in late)   # drained, not dropped
        with pytest.raises(QueueFull, match="shutting down"):
            engine.submit(Request([1], SamplingParams(max_new_tokens=1)))
    finally:
        engine.stop(drain=False)
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["generated_tokens"] == 12 + 3 * 40
    assert stats["ttft_s"]["p50"] > 0 and stats["itl_s"]["p50"] > 0 and stats["tokens_per_s"] > 0

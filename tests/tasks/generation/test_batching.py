"""Continuous batching changes nothing: 64 requests of mixed prompt and output lengths,
submitted at staggered steps (joining a running batch, while others finish and leave), get
exactly the tokens each gets alone — greedy, and sampled with a seed."""

from __future__ import annotations

import random

import pytest

from storage.errors import ConfigError

from tasks.generation import Engine, Request, SamplingParams, runner_for_model
from tests.tasks.generation.conftest import alone, random_prompt


def _workload(sampled: bool) -> list[Request]:
    rng = random.Random(7)
    requests = []
    for i in range(64):
        if sampled:
            params = SamplingParams(max_new_tokens=rng.randint(1, 16), temperature=rng.choice([0.7, 1.0, 1.5]),
                                    top_k=rng.choice([0, 5, 20]), top_p=rng.choice([1.0, 0.9, 0.5]), seed=i)
        else:
            params = SamplingParams(max_new_tokens=rng.randint(1, 16))
        requests.append(Request(random_prompt(rng, 1, 24), params))
    return requests


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_staggered_batch_gives_what_each_gets_alone(model, sampled):
    requests = _workload(sampled)
    engine = Engine(runner_for_model(model), pool_tokens=1024, block_size=8, max_batch=24, max_tokens_per_step=64)
    handles, pending, most_running = [], list(requests), 0
    rng = random.Random(3)
    while pending or engine.has_work:
        for _ in range(rng.randint(0, 4)):      # 0-4 arrivals per step
            if pending:
                handles.append(engine.submit(pending.pop(0)))
        engine.step()
        most_running = max(most_running, len(engine.scheduler.running))
    assert most_running > 8                     # they really shared the batch
    for request, handle in zip(requests, handles):
        expected = alone(model, request.prompt, request.params)
        assert handle.result().tokens == expected, request


def test_seeded_samples_differ_by_seed_and_repeat_by_seed(model):
    prompt = [5, 6, 7]
    a = alone(model, prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
    b = alone(model, prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
    c = alone(model, prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=2))
    assert a == b and a != c


def test_offline_generate_keeps_order_and_queue_bound():
    from tests.tasks.generation.conftest import tiny_gpt

    model = tiny_gpt()
    requests = _workload(sampled=False)[:20]
    engine = Engine(runner_for_model(model), pool_tokens=512, block_size=8, max_batch=8, max_waiting=3)
    results = engine.generate(requests)
    assert [r.request_id for r in results] == [q.request_id for q in requests]
    assert results[5].tokens == alone(model, requests[5].prompt, requests[5].params)
    bad = [Request([1, 2], SamplingParams(max_new_tokens=8)) for _ in range(5)] + [Request([], SamplingParams())]
    with pytest.raises(ConfigError, match="the prompt is empty"):
        engine.generate(bad)
    assert not engine.has_work and engine.pool.num_used == 0

"""Greedy decoding with the paged KV cache equals a full recompute without cache, token for
token, for the built-in GPT, a tiny hf: Llama (grouped-query attention) and a tiny GPT-2."""

from __future__ import annotations

import random

import pytest
import torch

from tasks.generation import Engine, Request, SamplingParams, runner_for_model
from tests.tasks.generation.conftest import random_prompt, reference_greedy


@pytest.mark.parametrize("block_size,step_tokens", [(8, 256), (4, 5)])
def test_cached_greedy_equals_full_recompute(model, block_size, step_tokens):
    """Also with small blocks and a small step budget, so prompts are prefilled in chunks."""
    rng = random.Random(1)
    prompts = [random_prompt(rng, 1, 40) for _ in range(4)]
    engine = Engine(runner_for_model(model), pool_tokens=512, block_size=block_size, max_batch=4,
                    max_tokens_per_step=step_tokens)
    handles = [engine.submit(Request(p, SamplingParams(max_new_tokens=24))) for p in prompts]
    engine.run_until_done()
    for prompt, handle in zip(prompts, handles):
        result = handle.result()
        assert result.tokens == reference_greedy(model, prompt, 24)
        assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)


def test_generation_reaches_the_end_of_the_context(model):
    runner = runner_for_model(model)
    prompt = list(range(1, runner.context - 10))
    engine = Engine(runner, pool_tokens=runner.context, block_size=16, max_batch=4, max_tokens_per_step=32)
    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=10)))
    engine.run_until_done()
    assert handle.result().tokens == reference_greedy(model, prompt, 10)


def test_chunked_prefill_keeps_decoders_running(model):
    """A long prompt arriving while others decode is prefilled over several steps, and every
    step still advances the decoding sequences."""
    engine = Engine(runner_for_model(model), pool_tokens=512, block_size=8, max_batch=4, max_tokens_per_step=8)
    short = [engine.submit(Request([3, 4, 5], SamplingParams(max_new_tokens=30))) for _ in range(2)]
    engine.step()
    engine.step()
    long_prompt = list(range(1, 60))
    long = engine.submit(Request(long_prompt, SamplingParams(max_new_tokens=5)))
    before = [len(h.tokens) for h in short]
    steps = 0
    while not long.tokens:
        engine.step()
        steps += 1
    assert steps >= 59 // 6   # 8 tokens a step, 2 of them for the decoders
    assert [len(h.tokens) for h in short] == [b + steps for b in before]
    engine.run_until_done()
    assert long.result().tokens == reference_greedy(model, long_prompt, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_greedy_on_cuda_equals_full_recompute(model):
    model = model.to("cuda")
    rng = random.Random(2)
    prompts = [random_prompt(rng, 1, 40) for _ in range(4)]
    engine = Engine(runner_for_model(model), pool_tokens=512, block_size=8, max_batch=4, max_tokens_per_step=16)
    assert engine.cache.k.is_cuda
    handles = [engine.submit(Request(p, SamplingParams(max_new_tokens=16))) for p in prompts]
    engine.run_until_done()
    model = model.to("cpu")
    for prompt, handle in zip(prompts, handles):
        assert handle.result().tokens == reference_greedy(model, prompt, 16)

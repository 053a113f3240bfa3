"""Tiny language models with random weights, and references to check the engine against."""

from __future__ import annotations

import random

import pytest
import torch

from tasks.generation import Engine, Request, SamplingParams, runner_for_model

VOCAB = 97


def tiny_gpt():
    from tasks.models.gpt import build

    torch.manual_seed(0)
    return build(vocab_size=VOCAB, seq_len=96, d_model=32, n_heads=4, n_layers=2).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=96,
                     bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"gpt": tiny_gpt, "llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine two
    spinning threads made these tests ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Full recompute at every step, no cache: GPT.generate_greedy, or the HF model's forward."""
    from tasks.models.gpt import GPT

    tokens = torch.tensor([prompt])
    if isinstance(model, GPT):
        return model.generate_greedy(tokens, n)[0, len(prompt):].tolist()
    for _ in range(n):
        logits = model(input_ids=tokens, use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):].tolist()


def alone(model, prompt: list[int], params: SamplingParams, **engine_kwargs) -> list[int]:
    """The tokens a request gets when it is the only one in the engine."""
    engine = Engine(runner_for_model(model), **{"pool_tokens": 512, "block_size": 8, **engine_kwargs})
    handle = engine.submit(Request(prompt, params))
    engine.run_until_done()
    return handle.result().tokens


def random_prompt(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]

"""Bad requests raise clear ConfigErrors naming the value and what is allowed; stop strings,
stop token ids and end-of-text end a request."""

from __future__ import annotations

import pytest

from storage.errors import ConfigError
from tasks.generation import Engine, Request, SamplingParams, runner_for_model
from tests.tasks.generation.conftest import VOCAB, alone, tiny_gpt


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": -3}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"temperature": -0.1}, r"temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_bad_sampling_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_and_lengths(gpt):
    engine = Engine(runner_for_model(gpt), pool_tokens=64, block_size=8, max_new_tokens_limit=40)
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        engine.submit(Request([], ok))
    with pytest.raises(ConfigError, match=r"the prompt has 96 tokens; the model's context is 96"):
        engine.submit(Request([1] * 96, ok))
    with pytest.raises(ConfigError, match=r"ask for at most 6 new tokens"):
        engine.submit(Request([1] * 90, SamplingParams(max_new_tokens=10)))
    with pytest.raises(ConfigError, match="max_new_tokens is 41; this engine allows at most 40"):
        engine.submit(Request([1], SamplingParams(max_new_tokens=41)))
    with pytest.raises(ConfigError, match="KV pool holds 64"):
        engine.submit(Request([1] * 40, SamplingParams(max_new_tokens=30)))
    with pytest.raises(ConfigError, match=rf"prompt token ids must be in \[0, {VOCAB}\)"):
        engine.submit(Request([1, VOCAB], ok))
    with pytest.raises(ConfigError, match="encode text"):
        Request("hello", ok)
    with pytest.raises(ConfigError, match="stop strings need the model's tokenizer"):
        engine.submit(Request([1], SamplingParams(stop=("x",))))
    assert not engine.has_work and engine.pool.num_used == 0


def test_bad_engine_settings(gpt):
    runner = runner_for_model(gpt)
    with pytest.raises(ConfigError, match="block_size must be an integer >= 1"):
        Engine(runner, block_size=0)
    with pytest.raises(ConfigError, match="holds no block of 16 tokens"):
        Engine(runner, pool_tokens=8)
    with pytest.raises(ConfigError, match=r"max_tokens_per_step \(8\) must be at least max_batch \(16\)"):
        Engine(runner, max_batch=16, max_tokens_per_step=8)
    with pytest.raises(ConfigError, match="not both"):
        Engine(runner, pool_tokens=64, pool_bytes=10_000)


def sampled(**kwargs) -> SamplingParams:
    """Seeded sampling: a random tiny model's greedy output is one token repeated."""
    return SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, **kwargs)


def test_stop_token_ids_and_end_of_text(gpt):
    free = alone(gpt, [1, 2, 3], sampled())
    stop_at = next(i for i, t in enumerate(free) if i > 5 and t not in free[:i])
    stopped = Engine(runner_for_model(gpt), pool_tokens=128, block_size=8)
    handle = stopped.submit(Request([1, 2, 3], sampled(stop_token_ids=(free[stop_at],))))
    stopped.run_until_done()
    assert handle.result().tokens == free[:stop_at] and handle.result().finish_reason == "stop"
    with_eot = Engine(runner_for_model(gpt, eot_id=free[stop_at]), pool_tokens=128, block_size=8)
    handle = with_eot.submit(Request([1, 2, 3], sampled()))
    with_eot.run_until_done()
    assert handle.result().tokens == free[:stop_at] and handle.result().finish_reason == "stop"
    ignoring = with_eot.submit(Request([1, 2, 3], sampled(ignore_eos=True)))
    with_eot.run_until_done()
    assert ignoring.result().tokens == free


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models

    vocab = {chr(ord("!") + i): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="!"))
    tok.decoder = decoders.Fuse()
    return tok


def test_stop_strings_cut_the_text_and_never_stream_it(gpt):
    tok = _char_tokenizer()
    runner = runner_for_model(gpt, tokenizer=tok)
    engine = Engine(runner, pool_tokens=128, block_size=8)
    free = engine.submit(Request([1, 2, 3], sampled()))
    engine.run_until_done()
    text = free.result().text
    assert text == tok.decode(free.result().tokens) and len(text) == 30
    stop = text[10:13]
    cut = text[:text.find(stop)]
    handle = engine.submit(Request([1, 2, 3], sampled(stop=(stop, "never"))))
    engine.run_until_done()
    events = list(handle)
    assert "".join(e.text for e in events) == cut == handle.result().text
    assert handle.result().finish_reason == "stop"

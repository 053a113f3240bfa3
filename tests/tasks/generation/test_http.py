"""Generation over HTTP: a real server on loopback over a tiny hf: Llama (random weights, a
character tokenizer made here), a real HTTP client. Answers equal the engine's own, streamed
or not; the KV pool stays bounded (admission waits, then 429); a client that leaves gets its
request cancelled and its blocks back; bad input gets 400; SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tasks.generation import Engine, Request, SamplingParams, load_runner
from tasks.inference.config import ServeConfig
from tasks.inference.server import BackgroundServer
from tests.conftest import ROOT
from tests.tasks.generation.conftest import VOCAB, tiny_llama

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "def hello(name):"


def char_tokenizer():
    """Printable ASCII, one id per character (a BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE({chr(32 + i): i for i in range(VOCAB)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok


def save_model(folder, model, chat: bool) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    if chat:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(), chat_template=TEMPLATE).save_pretrained(folder)
    else:
        char_tokenizer().save(str(folder / "tokenizer.json"))
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("plain"), tiny_llama(), chat=False)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("chat"), tiny_llama(), chat=True)


def serve(model: str, **options) -> BackgroundServer:
    return BackgroundServer(ServeConfig(model=model, port=0, max_new_tokens_limit=64, **options))


@pytest.fixture(scope="module")
def server(plain_model):
    with serve(plain_model) as srv:
        yield srv


def direct(model: str, prompt: list[int], params: SamplingParams):
    """What the engine itself gives, no HTTP."""
    engine = Engine(load_runner(model), pool_tokens=512, block_size=8)
    handle = engine.submit(Request(prompt, params))
    engine.run_until_done()
    return handle.result()


def sse_events(lines) -> list:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completions_equal_the_engine_streamed_or_not(server, plain_model):
    ids = char_tokenizer().encode(PROMPT).ids
    expected = direct(plain_model, ids, SamplingParams(max_new_tokens=20))
    body = {"model": plain_model, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["object"] == "text_completion" and doc["model"] == plain_model
    (choice,) = doc["choices"]
    assert choice["token_ids"] == expected.tokens and choice["text"] == expected.text
    assert choice["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 20, "total_tokens": len(ids) + 20}
    as_ids = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": ids}, timeout=60).json()
    assert as_ids["choices"][0]["token_ids"] == expected.tokens

    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(list(r.iter_lines()))
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected.tokens
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 20 + ["length"]
    assert chunks[-1]["usage"] == doc["usage"] and all(c["object"] == "text_completion" for c in chunks)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        last = sse_events(list(r.iter_lines()))[-1]
    assert last["choices"] == [] and last["usage"] == doc["usage"], "OpenAI's usage-only last chunk"


def test_sampling_with_a_seed_and_stop_strings(server, plain_model):
    ids = char_tokenizer().encode(PROMPT).ids
    sampled = direct(plain_model, ids, SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=20, seed=7))
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 7}
    got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert got["token_ids"] == sampled.tokens
    stop = sampled.text[5:7]
    cut = httpx.post(f"{server.url}/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["text"] == sampled.text[:sampled.text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_chat_completions_with_the_models_chat_template(chat_model):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    hf_tok = AutoTokenizer.from_pretrained(chat_model[3:], local_files_only=True)
    prompt = hf_tok(hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    expected = direct(chat_model, prompt, SamplingParams(max_new_tokens=12))
    with serve(chat_model) as srv:
        body = {"messages": messages, "max_tokens": 12, "temperature": 0}
        doc = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = sse_events(list(r.iter_lines()))
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert doc["choices"][0]["token_ids"] == expected.tokens
    assert doc["usage"]["prompt_tokens"] == len(prompt) and doc["usage"]["completion_tokens"] == 12
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["object"] == "chat.completion.chunk"


def test_chat_without_a_template_is_a_clear_400(server):
    answer = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 400
    assert "has no chat template" in answer.json()["error"]["message"]


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": []}, "the prompt is empty"),
    ({"prompt": "x" * 100}, "the model's context is 96 tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens must be >= 1"),
    ({"prompt": "hi", "max_tokens": 65}, "this engine allows at most 64"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"prompt": "hi", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "frobnicate": 1}, "unknown field 'frobnicate'; allowed:"),
    ({"prompt": "hi", "n": 2}, "n must be 1"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"prompt": ["a", "b"]}, "one prompt per request"),
    ({"prompt": [1, VOCAB + 5]}, f"prompt token ids must be in [0, {VOCAB})"),
    ({}, "the body has no prompt"),
])
def test_bad_input_is_a_400_naming_it(server, body, message):
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_an_oversized_body_is_a_413(server):
    answer = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * (5 * 2**20)}, timeout=60)
    assert answer.status_code == 413
    assert "at most 4,194,304 (send a shorter prompt)" in answer.json()["error"]["message"]


def test_not_json_unknown_model_and_models_list(server, plain_model):
    assert httpx.post(f"{server.url}/v1/completions", content=b"{nope").status_code == 400
    other = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert other.status_code == 404 and plain_model in other.json()["error"]["message"]
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [plain_model] and models["data"][0]["max_model_len"] == 96


class StepGate:
    """Lets the engine's loop run only the steps the test allows (it waits outside the engine's
    lock, so requests are still submitted and cancelled meanwhile)."""

    def __init__(self, engine):
        self.engine, self.real = engine, engine.step
        self.allowed = threading.Semaphore(0)
        self.opened = False
        engine.step = self.step

    def step(self):
        if not self.opened:
            self.allowed.acquire()
        return self.real()

    def allow(self, steps: int = 1) -> None:
        self.allowed.release(steps)

    def open(self) -> None:
        self.opened = True
        self.allowed.release(1000)


async def until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the engine never reached the expected state"
        await asyncio.sleep(0.01)


def test_a_full_pool_makes_requests_wait_then_a_full_queue_gets_429(plain_model):
    # 8 blocks of 8 tokens: two prompts of 20 tokens (3 blocks each) run, the next two wait
    # for blocks, a fifth finds the waiting queue full.
    prompt = list(range(1, 21))
    expected = direct(plain_model, prompt, SamplingParams(max_new_tokens=30)).tokens
    srv = serve(plain_model, kv_pool_tokens=64, kv_block_size=8, max_batch_size=4, max_waiting=2)
    engine = srv.service.engine
    gate = StepGate(engine)
    body = {"prompt": prompt, "max_tokens": 30, "temperature": 0}

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            post = lambda: asyncio.create_task(client.post("/v1/completions", json=body))  # noqa: E731
            first = [post(), post()]
            await until(lambda: engine.stats()["waiting"] == 2)
            gate.allow(1)
            await until(lambda: engine.stats()["running"] == 2)
            queued = [post(), post()]
            await until(lambda: engine.stats()["waiting"] == 2)
            refused = await client.post("/v1/completions", json=body)
            state = engine.stats()
            gate.open()
            return refused, state, await asyncio.gather(*first, *queued)

    try:
        refused, state, answers = asyncio.run(scenario())
        text = httpx.get(f"{srv.url}/metrics").text
    finally:
        gate.open()
        srv.stop()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "waiting queue is full" in refused.json()["error"]["message"]
    assert state["running"] == 2 and state["waiting"] == 2 and state["kv_pool"]["blocks_used"] == 6
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.json()["choices"][0]["token_ids"] == expected for a in answers), "waiting and preemption change nothing"
    pool = engine.stats()["kv_pool"]
    assert pool["peak_blocks_used"] <= pool["blocks_total"] == 8 and pool["blocks_used"] == 0
    assert 'swarm_serve_requests_total{code="429"} 1.0' in text


def test_a_client_that_leaves_gets_its_request_cancelled_and_blocks_back(plain_model):
    srv = serve(plain_model, kv_pool_tokens=256, kv_block_size=8)
    engine = srv.service.engine
    gate = StepGate(engine)
    body = {"prompt": list(range(1, 30)), "max_tokens": 50, "temperature": 0}

    async def leave_mid_stream():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                gate.allow(1)   # the prefill: the first token
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
                assert engine.stats()["kv_pool"]["blocks_used"] == 4
        await until(lambda: engine.stats()["requests_cancelled"] == 1)   # no step ran since

    async def leave_while_waiting_for_the_answer():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await until(lambda: engine.stats()["waiting"] == 1)
            gate.allow(1)
            await until(lambda: engine.stats()["running"] == 1)
            task.cancel()
        await until(lambda: engine.stats()["requests_cancelled"] == 2)

    try:
        asyncio.run(leave_mid_stream())
        assert engine.stats()["kv_pool"]["blocks_used"] == 0
        asyncio.run(leave_while_waiting_for_the_answer())
        stats = engine.stats()
        gate.open()
        after = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        text = httpx.get(f"{srv.url}/metrics").text
    finally:
        gate.open()
        srv.stop()
    assert stats["kv_pool"]["blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 50
    assert "swarm_generate_requests_cancelled_total 2.0" in text


def test_metrics_name_the_generation_series(server):
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5}, timeout=60)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("swarm_generate_time_to_first_token_seconds_bucket", "swarm_generate_inter_token_latency_seconds_bucket",
                 "swarm_generate_tokens_per_second", "swarm_generate_running_sequences",
                 "swarm_generate_waiting_sequences", "swarm_generate_kv_pool_usage_ratio",
                 "swarm_generate_kv_pool_blocks_used", "swarm_generate_generation_tokens_total",
                 "swarm_serve_requests_total", "swarm_serve_request_latency_seconds_bucket"):
        assert name in text, name
    assert float(re.search(r"^swarm_generate_tokens_per_second (\S+)$", text, re.M).group(1)) > 0
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["kind"] == "language-model" and health["context"] == 96


def test_sigterm_lets_the_running_request_finish_and_refuses_new_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Long enough a generation (1000 tokens) that SIGTERM lands mid-stream.
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = save_model(tmp_path, LlamaForCausalLM(cfg).eval(), chat=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "serve", model, "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://\S+", line)
        assert found, f"no URL in {line!r}; {proc.communicate(timeout=30)}"
        url = found.group(0)
        body = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "stream": True}
        lines, refused = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if refused is None and len(lines) > 4:
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
                    try:
                        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "y"}, timeout=10).status_code
                    except httpx.TransportError as exc:
                        refused = type(exc).__name__
                    refused_at = len(lines)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    chunks = sse_events(lines)
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 1000
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert refused in (503, "ConnectError"), refused
    assert refused_at < len(lines) - 2, "the refusal came while the first request was still streaming"
    assert proc.returncode == 0, stderr
    assert "stopped after answering 1 requests" in stdout and "1,000 tokens generated" in stdout


@pytest.mark.parametrize("options, message", [
    ({"replicas": 2}, "one generation engine in this process"),
    ({"max_batch_size": 64, "max_tokens_per_step": 32}, "--max-tokens-per-step (32) must be at least --max-batch-size (64)"),
])
def test_serving_options_that_do_not_fit_a_language_model_are_refused(plain_model, options, message):
    from storage.errors import ConfigError
    from tasks.inference.server import make_service

    with pytest.raises(ConfigError) as caught:
        make_service(ServeConfig(model=plain_model, port=0, **options))
    assert message in str(caught.value)


def test_the_server_answers_while_the_model_runs(plain_model):
    """The engine's lock is not held through a forward pass: while one runs (held here), the
    event loop still admits requests, answers /metrics and cancels."""
    srv = serve(plain_model)
    engine = srv.service.engine
    runner, forward = engine.runner, engine.runner.forward
    entered, release = threading.Event(), threading.Event()

    def held_forward(*args):
        entered.set()
        release.wait(60)
        return forward(*args)

    runner.forward = held_forward
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            first = threading.Thread(target=client.post, args=("/v1/completions",),
                                     kwargs={"json": {"prompt": "abc", "max_tokens": 5}})
            first.start()
            assert entered.wait(30)
            began = time.monotonic()
            assert "swarm_generate_running_sequences 1.0" in client.get("/metrics").text
            assert client.post("/v1/completions", json={"prompt": ""}).status_code == 400
            assert engine.stats()["running"] == 1
            assert time.monotonic() - began < 5, "answered without waiting for the forward pass"
            release.set()
            first.join(30)
    finally:
        release.set()
        runner.forward = forward
        srv.stop()


def test_our_lm_checkpoint_is_served_for_generation(tmp_path):
    """A causal-lm checkpoint of the built-in GPT (tokenizer.json and eot_id beside it) is a
    language model to serve-model; it has no chat template."""
    from storage import checkpoint as ckpt
    from tasks.generation.loading import is_language_model
    from tests.tasks.generation.conftest import tiny_gpt

    model = tiny_gpt()
    cfg = model.config
    args = {"vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
            "n_layers": cfg.n_layers}
    folder = tmp_path / "ckpt-000000005"
    folder.mkdir()
    char_tokenizer().save(str(folder / "tokenizer.json"))
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    ckpt.write(str(folder), tensors, {"model": {"name": "gpt", "args": args}, "task": "causal-lm", "eot_id": 96})
    assert is_language_model(str(tmp_path))
    ids = char_tokenizer().encode(PROMPT).ids
    expected = direct(str(tmp_path), ids, SamplingParams(max_new_tokens=10))
    with serve(str(tmp_path)) as srv:
        answer = httpx.post(f"{srv.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0},
                            timeout=60).json()
        chat = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer["choices"][0]["token_ids"] == expected.tokens and answer["choices"][0]["text"] == expected.text
    assert chat.status_code == 400 and "has no chat template" in chat.json()["error"]["message"]


def test_a_failed_step_ends_its_requests_with_500_and_the_server_goes_on(plain_model):
    srv = serve(plain_model)
    runner, forward = srv.service.engine.runner, srv.service.engine.runner.forward
    failures = [RuntimeError("the device fell over")]

    def failing_forward(*args):
        if failures:
            raise failures.pop()
        return forward(*args)

    runner.forward = failing_forward
    try:
        failed = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5}, timeout=60)
        after = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5}, timeout=60)
        stats = srv.service.engine.stats()
    finally:
        runner.forward = forward
        srv.stop()
    assert failed.status_code == 500
    assert "generation failed: RuntimeError: the device fell over" in failed.json()["error"]["message"]
    assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 5
    assert stats["kv_pool"]["blocks_used"] == 0

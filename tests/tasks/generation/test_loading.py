"""load_runner: hf: folders (Llama and GPT-2 families, with their tokenizer.json) and our own
LM checkpoints (tokenizer.json and eot_id from the folder, as the LM contract says); a model
that is not a language model is refused clearly."""

from __future__ import annotations

import pytest
import torch

from storage import checkpoint as ckpt
from storage.errors import ConfigError
from tasks.generation import Engine, Request, SamplingParams, load_runner
from tasks.generation.runners.gpt import GPTRunner
from tasks.generation.runners.hf import GPT2Runner, LlamaRunner
from tests.tasks.generation.conftest import reference_greedy, tiny_gpt, tiny_gpt2, tiny_llama
from tests.tasks.generation.test_requests import _char_tokenizer


def _greedy(runner, prompt, n):
    engine = Engine(runner, pool_tokens=128, block_size=8)
    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=n)))
    engine.run_until_done()
    return handle.result()


@pytest.mark.parametrize("make,runner_type", [(tiny_llama, LlamaRunner), (tiny_gpt2, GPT2Runner)])
def test_hf_folder(tmp_path, make, runner_type):
    model = make()
    model.save_pretrained(tmp_path, safe_serialization=True)
    _char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    runner = load_runner(f"hf:{tmp_path}")
    assert isinstance(runner, runner_type) and runner.tokenizer is not None
    result = _greedy(runner, [1, 2, 3], 8)
    assert result.tokens == reference_greedy(model, [1, 2, 3], 8)
    assert result.text == runner.tokenizer.decode(result.tokens)


def test_hf_folder_errors(tmp_path):
    """hf: folders are found and checked by tasks.models.hf, as training finds them."""
    with pytest.raises(ConfigError, match="has no config.json"):
        load_runner(f"hf:{tmp_path}")
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        load_runner(f"hf:{tmp_path}")
    BertModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ConfigError, match="'bert' model; generation supports llama"):
        load_runner(f"hf:{tmp_path}")


def _save(url, model, name, args, **meta):
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    return ckpt.write(url, tensors, {"model": {"name": name, "args": args}, **meta})


def test_gpt_checkpoint_with_tokenizer_and_eot(tmp_path):
    model = tiny_gpt()
    cfg = model.config
    args = {"vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers}
    folder = tmp_path / "ckpt-000000010"
    folder.mkdir()
    _char_tokenizer().save(str(folder / "tokenizer.json"))
    _save(str(folder), model, "gpt", args, task="causal-lm", eot_id=7)
    runner = load_runner(str(tmp_path))          # the root: its latest checkpoint
    assert isinstance(runner, GPTRunner) and runner.eos_token_ids == (7,) and runner.tokenizer is not None
    expected = reference_greedy(model, [1, 2, 3], 8)
    got = _greedy(runner, [1, 2, 3], 8).tokens
    assert got == expected[:len(got)] and (len(got) == 8 or expected[len(got)] == 7)


def test_classifier_checkpoint_is_refused(tmp_path):
    from tasks.models import build_model

    model = build_model("mlp", {"in_features": 4, "num_classes": 2})
    _save(str(tmp_path / "ckpt-000000001"), model, "mlp", {"in_features": 4, "num_classes": 2})
    with pytest.raises(ConfigError, match="not a language model"):
        load_runner(str(tmp_path))
    assert torch.is_grad_enabled()


def test_a_wrapped_hf_model_gets_its_runner():
    """An LM checkpoint of an hf: model may rebuild as a training wrapper around it."""
    from tasks.generation import runner_for_model

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    model = tiny_llama()
    runner = runner_for_model(Wrapper(model), eot_id=5)
    assert isinstance(runner, LlamaRunner) and runner.model is model and 5 in runner.eos_token_ids

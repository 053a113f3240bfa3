"""swarm optimize on language models: int8, casts, LoRA merge, MLP-width pruning; perplexity gate."""

from __future__ import annotations

import os

import pytest

from storage.errors import ConfigError
from tasks.optimize.config import OptimizeConfig
from tasks.optimize.pipeline import optimize, prepare_optimization
from tasks.optimize.report import perplexity
from tasks.training import TrainConfig
from tests.lm_data import text_dataset
from tests.tasks.test_lm_training import TINY_GPT, run, tiny_hf


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmopt")
    text = text_dataset(str(root / "text"))
    gpt = run(TrainConfig(dataset=text, epochs=3, batch_size=8, model_args=TINY_GPT, checkpoint_dir=str(root / "gpt")))
    folders = {k: tiny_hf(root / k, k) for k in ("gpt2", "llama")}
    hf = {k: run(TrainConfig(dataset=text, model=f"hf:{f}", epochs=1, batch_size=8, checkpoint_dir=str(root / f"c-{k}")))
          for k, f in folders.items()}
    return {"text": text, "gpt": gpt.checkpoint, **{k: r.checkpoint for k, r in hf.items()}, "folders": folders,
            "root": root}


def _optimize(lm, checkpoint, out, **options):
    cfg = OptimizeConfig(checkpoint=checkpoint, eval_dataset=lm["text"], output=str(lm["root"] / out), **options)
    return cfg, optimize(cfg, prepare_optimization(cfg))


def _reloaded_perplexity(cfg, result):
    from tasks.models.loading import load_model
    from tasks.optimize.lm import eval_blocks

    plan = prepare_optimization(cfg.model_copy(update={"output": cfg.output + "-unused"}))
    loaded = load_model(result.output)
    assert loaded.meta["task"] == "causal-lm" and loaded.meta["eot_id"] == 0
    assert os.path.exists(f"{result.output}/tokenizer.json")
    return perplexity(loaded.model, eval_blocks(cfg, plan), plan.lm)


@pytest.mark.parametrize("model", ["gpt", "gpt2", "llama"])
@pytest.mark.parametrize("options", [{"quantize": "int8-dynamic"}, {"quantize": "int8-weight-only"}, {"dtype": "bf16"},
                                     {"prune": 0.5, "structured": True, "max_perplexity_increase": 1.0}],
                         ids=["int8-dynamic", "int8-weight-only", "bf16", "prune-mlp"])
def test_optimized_lm_is_gated_on_perplexity_and_reloads(lm, model, options):
    name = f"{model}-{'-'.join(map(str, options.values()))}"
    cfg, result = _optimize(lm, lm[model], name, **options)
    assert result.passed and result.output
    assert result.before["perplexity"] > 1 and result.after["perplexity"] > 1
    assert result.perplexity_increase == pytest.approx(result.after["perplexity"] / result.before["perplexity"] - 1,
                                                       abs=1e-5)
    assert result.after["size_bytes"] < result.before["size_bytes"]
    if options.get("structured"):
        assert result.after["parameters"] < result.before["parameters"]
    else:
        assert result.perplexity_increase < 0.02
    assert _reloaded_perplexity(cfg, result) == pytest.approx(result.after["perplexity"], rel=1e-4)


def test_perplexity_gate_refuses_and_writes_nothing(lm):
    cfg, result = _optimize(lm, lm["gpt"], "refused", prune=0.9, structured=True, max_perplexity_increase=0.01)
    assert not result.passed and result.output is None
    assert "validation perplexity rose" in result.gate_message() and "--max-perplexity-increase" in result.gate_message()
    assert not os.path.exists(cfg.output)


@pytest.mark.parametrize("base", ["gpt", "llama"])
def test_merge_lora_of_an_lm_keeps_its_perplexity(lm, base, tmp_path):
    if base == "gpt":
        tuned = run(TrainConfig(dataset=lm["text"], epochs=1, batch_size=8, model_args=TINY_GPT, init_from=lm["gpt"],
                                lora_rank=4, lora_targets=r"(qkv|mlp\.fc)", checkpoint_dir=str(tmp_path / "l")))
    else:
        tuned = run(TrainConfig(dataset=lm["text"], init_from=f"hf:{lm['folders']['llama']}", epochs=1, batch_size=8,
                                lora_rank=4, lora_targets=r"(q_proj|up_proj)", checkpoint_dir=str(tmp_path / "l")))
    with pytest.raises(ConfigError, match="--merge-lora"):
        prepare_optimization(OptimizeConfig(checkpoint=tuned.checkpoint, eval_dataset=lm["text"],
                                            output=str(tmp_path / "x"), quantize="int8-dynamic"))
    cfg, result = _optimize(lm, tuned.checkpoint, f"merged-{base}", merge_lora=True, max_perplexity_increase=0.0001)
    assert result.passed
    assert result.after["perplexity"] == pytest.approx(result.before["perplexity"], rel=1e-4)
    assert _reloaded_perplexity(cfg, result) == pytest.approx(result.after["perplexity"], rel=1e-4)

"""Offline generation as plain functions: plan, groups, commit; output rows equal the engine
run directly; a run stopped between groups resumes with exactly one output per prompt; bad
input is refused before anything is written."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from storage.dataset import Dataset
from storage.errors import ConfigError, SourceError
from tasks.generation import Engine, Request, SamplingParams, load_runner
from tasks.generation.offline import commit_generation, generate_group, group_units, plan_generation
from tasks.generation.offline_config import GenerateConfig
from tests.generation_data import CONTEXT, classifier_checkpoint, jsonl_prompts, lm_checkpoint, prompts
from tests.predictions import leftovers


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return lm_checkpoint(tmp_path_factory.mktemp("lm"))


def _run(cfg: GenerateConfig, groups: int = 2, only: int | None = None):
    plan = plan_generation(cfg)
    outputs = [generate_group(g) for g in group_units(plan, groups) if only in (None, g.index)]
    if only is not None:
        return plan, outputs
    return plan, commit_generation(plan, outputs, 1.0)


def _rows(out: str) -> list[dict]:
    return Dataset.open(out).read_table().to_pylist()


def test_outputs_equal_the_engine_and_rerun_skips(tmp_path, lm):
    texts = prompts(11)
    cfg = GenerateConfig(model=lm, prompts=jsonl_prompts(tmp_path / "p.jsonl", texts), output=str(tmp_path / "out"),
                         max_new_tokens=12, prompts_per_shard=4, max_batch=4, max_tokens_per_step=16)
    plan, result = _run(cfg)
    assert (result.rows, result.shards, result.generated_shards, result.skipped_shards) == (11, 3, 3, 0)
    rows = _rows(cfg.output)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(11))
    assert Dataset.open(cfg.output).manifest.metadata["kind"] == "generations"

    runner = load_runner(lm)
    direct = Engine(runner, pool_tokens=1024, block_size=8, max_batch=16).generate(
        [Request(runner.tokenizer.encode(t).ids, SamplingParams(max_new_tokens=12)) for t in texts])
    by_id = {r["id"]: r for r in rows}
    for i, (text, expect) in enumerate(zip(texts, direct)):
        row = by_id[f"p{i}"]
        assert row["prompt"] == text
        assert row["completion_ids"] == expect.tokens and row["completion"] == expect.text
        assert row["completion_tokens"] == len(expect.tokens) and row["finish_reason"] == expect.finish_reason
    assert result.generated_tokens == sum(len(r.tokens) for r in direct) and result.samples
    assert result.occupancy and all(p[1] <= 4 for o in result.occupancy for p in o["points"])

    retried = generate_group(group_units(plan, 1)[0])  # a retried task: its finished shards are kept
    assert retried.entries == [] and retried.rows == 11
    again = plan_generation(cfg)
    assert (len(again.todo), len(again.done)) == (0, 3)
    assert commit_generation(again, [], 0.1).manifest_hash == result.manifest_hash
    assert leftovers(cfg.output) == []


def test_stopped_between_groups_resumes_with_one_output_per_prompt(tmp_path, lm):
    cfg = GenerateConfig(model=lm, prompts=jsonl_prompts(tmp_path / "p.jsonl", prompts(9), ids=False),
                         output=str(tmp_path / "out"), max_new_tokens=6, prompts_per_shard=3, temperature=0.8,
                         seed=7)
    _run(cfg, groups=3, only=1)  # killed before the commit: one group's shards on disk, no manifest
    plan, result = _run(cfg, groups=3)
    assert (len(plan.todo), len(plan.done)) == (2, 1)
    assert result.rows == 9 and result.skipped_shards == 1
    assert sorted(int(r["id"]) for r in _rows(cfg.output)) == list(range(9))

    fresh = tmp_path / "fresh"  # seeded samples do not depend on grouping
    _run(cfg.model_copy(update={"output": str(fresh)}), groups=1)
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(_rows(str(fresh)), key=key) == sorted(_rows(cfg.output), key=key)


def test_unpacked_text_dataset_prompts(tmp_path, lm):
    from tests.conftest import stage_plain

    src = jsonl_prompts(tmp_path / "docs.jsonl", prompts(12), column="text")
    tokenizer = str(tmp_path / "tok.json")
    with open(tokenizer, "w") as f:
        f.write(load_runner(lm).tokenizer.to_str())
    ds = str(tmp_path / "ds")
    stage_plain(source=src, dest=ds, tokenizer=tokenizer, packing="unpacked", keep_text=True, val_fraction=0.25)
    cfg = GenerateConfig(model=lm, prompts=ds, output=str(tmp_path / "out"), split="val", max_new_tokens=4)
    _, result = _run(cfg)
    assert result.rows == sum(e.rows for e in Dataset.open(ds).shards("val"))
    rows = _rows(cfg.output)
    assert all(r["prompt"] and r["completion_tokens"] >= 0 for r in rows)

    tokens_only = GenerateConfig(model=lm, prompts=ds, output=str(tmp_path / "out2"), prompt_column=None,
                                 max_new_tokens=4)
    assert plan_generation(tokens_only).rows == 12


def test_packed_text_dataset_prompts_are_block_heads(tmp_path, lm):
    from tests.lm_data import text_dataset

    ds = text_dataset(str(tmp_path / "packed"), n_docs=40, seq_len=32)
    cfg = GenerateConfig(model=lm, prompts=ds, output=str(tmp_path / "out"), split="val", max_new_tokens=4)
    with pytest.raises(ConfigError, match="packed text dataset without text: .* give --prompt-tokens N"):
        plan_generation(cfg)
    plan, result = _run(cfg.model_copy(update={"prompt_tokens": 8}))
    blocks = Dataset.open(ds).read_table(split="val").column("tokens").to_pylist()
    assert result.rows == len(blocks) and all(len(b.tokens[0]) <= 8 for b, _ in plan.todo)
    assert [len(t) for b, _ in plan.todo for t in b.tokens] == [
        len([i for i in blk[:8] if i != Dataset.open(ds).manifest.metadata["pad_id"]]) for blk in blocks]


@pytest.mark.parametrize("case,error,message", [
    ("empty", ConfigError, "prompt p1 of 'p.jsonl#0-3': the prompt is empty"),
    ("long", ConfigError, f"the model's context is {CONTEXT} tokens"),
    ("too_many_new", ConfigError, f"has a context of {CONTEXT} tokens, prompt included: ask for at most"),
    ("column", ConfigError, "prompt column 'body' is not in"),
    ("classifier", ConfigError, "is a classify model ('mlp'), not a language model"),
    ("missing", SourceError, "do not exist"),
    ("hf_missing", ConfigError, "does not exist or is not a folder"),
])
def test_bad_input_writes_nothing(tmp_path, lm, case, error, message):
    texts = prompts(3)
    kwargs = {"max_new_tokens": 8}
    if case == "empty":
        texts[1] = ""
    if case == "long":
        texts[2] = " ".join(["the quick brown fox"] * CONTEXT)
    if case == "too_many_new":
        kwargs["max_new_tokens"] = CONTEXT
    if case == "column":
        kwargs["prompt_column"] = "body"
    model = classifier_checkpoint(tmp_path / "clf") if case == "classifier" else lm
    if case == "hf_missing":
        model = f"hf:{tmp_path / 'no-model'}"
    source = jsonl_prompts(tmp_path / "p.jsonl", texts) if case != "missing" else str(tmp_path / "none.jsonl")
    out = tmp_path / "out"
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_generation(GenerateConfig(model=model, prompts=source, output=str(out), **kwargs))
    assert not out.exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"unknown": 1}, "Extra inputs are not permitted"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        GenerateConfig(model="m", prompts="p", output="o", **kwargs)


def test_hf_llama_folder_equals_the_engine(tmp_path, lm):
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    tokenizer = load_runner(lm).tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).eval()
    folder = tmp_path / "llama"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    texts = prompts(5)
    cfg = GenerateConfig(model=f"hf:{folder}", prompts=jsonl_prompts(tmp_path / "p.jsonl", texts),
                         output=str(tmp_path / "out"), max_new_tokens=8)
    _, result = _run(cfg)
    assert result.rows == 5
    runner = load_runner(f"hf:{folder}")
    direct = Engine(runner, pool_tokens=512, block_size=8).generate(
        [Request(tokenizer.encode(t).ids, SamplingParams(max_new_tokens=8)) for t in texts])
    by_id = {r["id"]: r["completion_ids"] for r in _rows(cfg.output)}
    assert [by_id[f"p{i}"] for i in range(5)] == [r.tokens for r in direct]

"""The offline generation flow on the session's Dask cluster and Prefect API, and `swarm generate`."""

from __future__ import annotations

import pytest

from storage.dataset import Dataset
from tasks.generation.offline_config import GenerateConfig
from tests.conftest import run_cli
from tests.flows.test_stage_flow import _prefect_records
from tests.generation_data import CONTEXT, classifier_checkpoint, jsonl_prompts, lm_checkpoint, prompts
from tests.predictions import leftovers


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return lm_checkpoint(tmp_path_factory.mktemp("lm"))


def test_flow_generates_on_workers_reports_and_resumes(dask_cluster, lm, tmp_path):
    import os

    from flows.generate import batch_generate

    config = GenerateConfig(model=lm, prompts=jsonl_prompts(tmp_path / "p.jsonl", prompts(24)),
                            output=str(tmp_path / "out"), max_new_tokens=10, prompts_per_shard=6, max_batch=8,
                            max_tokens_per_step=32)
    state = batch_generate(config, return_state=True)
    result = state.result()
    assert (result.rows, result.shards, result.generated_shards, result.skipped_shards) == (24, 4, 4, 0)
    ids = Dataset.open(config.output).read_table().column("id").to_pylist()
    assert sorted(ids) == sorted(f"p{i}" for i in range(24))
    assert leftovers(config.output) == []
    assert result.generated_tokens > 0 and result.tokens_per_second > 0
    assert all(not o["worker"].endswith(f":{os.getpid()}") for o in result.occupancy), "ran on worker processes"

    runs, arts = _prefect_records(state.state_details.flow_run_id)
    groups = [r for r in runs if r.name.startswith("generate-group")]
    assert len(groups) == 2 and all(r.state.is_completed() for r in groups)
    assert {a.key for a in arts if a.type == "table"} >= {"batch-generate", "sample-generations"}
    assert any(a.key == "batch-occupancy" and "data:image/png;base64," in a.data for a in arts)

    again = batch_generate(config)
    assert (again.generated_shards, again.skipped_shards) == (0, 4)
    assert again.manifest_hash == result.manifest_hash


def test_s3_prompts_and_output(dask_cluster, s3, bucket, lm, tmp_path):
    from flows.generate import batch_generate

    options = s3.storage_options
    s3.s3fs().put(jsonl_prompts(tmp_path / "p.jsonl", prompts(8)), f"{bucket}/prompts/p.jsonl")
    output = f"s3://{bucket}/generations"
    result = batch_generate(GenerateConfig(model=lm, prompts=f"s3://{bucket}/prompts/*.jsonl", output=output,
                                           max_new_tokens=4, prompts_per_shard=4, storage_options=options))
    assert (result.rows, result.shards) == (8, 2)
    assert sorted(Dataset.open(output, options).read_table().column("id").to_pylist()) == [f"p{i}" for i in range(8)]
    assert leftovers(output, options) == []


def test_cli_happy_path_and_rerun(dask_cluster, lm, tmp_path):
    source, out = jsonl_prompts(tmp_path / "p.jsonl", prompts(6)), str(tmp_path / "out")
    args = ("generate", lm, source, out, "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9",
            "--top-k", "20", "--seed", "3")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "6 prompts, 1 shards" in text and "1 generated, 0 already done" in text and "tokens/s" in text
    assert "Traceback" not in proc.stderr
    first = Dataset.open(out).read_table()
    again = run_cli(*args)
    assert again.returncode == 0 and "0 generated, 1 already done" in " ".join(again.stdout.split())
    assert Dataset.open(out).read_table().equals(first)


@pytest.mark.parametrize("case,extra,message", [
    ("empty", [], "prompt p1 of 'p.jsonl#0-3': the prompt is empty: give at least one token"),
    ("long", [], f"the model's context is {CONTEXT} tokens, so a prompt may have at most {CONTEXT - 1}"),
    ("ok", ["--max-new-tokens", "0", "--temperature", "-1", "--top-p", "0"],
     "invalid max-new-tokens (got 0): max_new_tokens must be >= 1|invalid temperature (got -1.0): temperature must be "
     "a finite number >= 0|invalid top-p (got 0.0): top_p must be in (0, 1]"),
    ("ok", ["--max-new-tokens", str(CONTEXT)], f"has a context of {CONTEXT} tokens, prompt included"),
    ("ok", ["--top-p", "1.5"], "invalid top-p (got 1.5): top_p must be in (0, 1]"),
    ("ok", ["--prompt-column", "body"], "prompt column 'body' is not in"),
    ("ok", ["--bogus", "1"], "No such option: --bogus"),
    ("classifier", [], "is a classify model ('mlp'), not a language model"),
])
def test_cli_bad_input(prefect_api, lm, tmp_path, case, extra, message):
    texts = prompts(3)
    if case == "empty":
        texts[1] = ""
    if case == "long":
        texts[2] = " ".join(["the quick brown fox"] * CONTEXT)
    model = classifier_checkpoint(tmp_path / "clf") if case == "classifier" else lm
    out = tmp_path / "out"
    proc = run_cli("generate", model, jsonl_prompts(tmp_path / "p.jsonl", texts), str(out), "--max-new-tokens", "8",
                   *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert all(m in " ".join(proc.stderr.split()) for m in message.split("|")), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()

"""Causal-LM training through the flow on a real Dask cluster and Prefect API: DDP equivalence,
artifacts, a killed rank's worker, and the CLI's bad-input errors."""

from __future__ import annotations

import pytest
import torch

from storage import checkpoint as ckpt
from tasks.training import TrainConfig
from tests.conftest import run_cli
from tests.flows.test_train_flow import artifacts_of, train_with_a_rank_worker_killed
from tests.lm_data import text_dataset

TINY_GPT = {"d_model": 32, "n_layers": 2, "n_heads": 2}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return text_dataset(str(tmp_path_factory.mktemp("lmflow") / "text"))


def _reference_single_rank(cfg: TrainConfig):
    """One process, global batches of 2 x ``batch``: the rows two ranks read at each step, with
    the same loss (the mean over the global batch's kept positions), clipping and schedule."""
    import numpy as np

    from storage import order
    from storage.dataset import Dataset
    from storage.loader import StreamingDataset
    from tasks.models import build_model
    from tasks.training import prepare_training
    from tasks.training.lm import lm_forward, lr_factor
    from tasks.training.lm_data import token_array

    plan = prepare_training(cfg.model_copy(update={"checkpoint_dir": "/nonexistent", "world_size": 1}))
    x = token_array(Dataset.open(cfg.dataset).read_table("train"), plan.lm.column)
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model_name, plan.model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ranks = [StreamingDataset(cfg.dataset, batch_size=cfg.batch_size, seed=cfg.seed, drop_last=True, rank=r,
                              world_size=2) for r in range(2)]
    total = len(ranks[0]) * cfg.epochs
    step = 0
    for epoch in range(cfg.epochs):
        per_rank = []
        for ds in ranks:
            ds.set_epoch(epoch)
            per_rank.append(order.rank_batches(ds.shard_rows, ds.spec(1)))
        for a, b in zip(*per_rank):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup_steps, "cosine", cfg.min_lr_ratio)
            loss_sum, count = lm_forward(model, torch.from_numpy(x[np.concatenate([a, b])]), plan.lm)
            opt.zero_grad()
            (loss_sum / count).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
    return model.state_dict(), step


def test_ddp_two_ranks_equal_one_rank_with_double_batch_and_lm_artifacts(dask_cluster, text, tmp_path):
    from flows.train import train_model

    cfg = TrainConfig(dataset=text, epochs=2, lr=3e-3, seed=5, world_size=2, batch_size=8, warmup_steps=4,
                      model_args=TINY_GPT, checkpoint_dir=str(tmp_path / "two"))
    state = train_model(cfg, return_state=True)
    two = state.result()
    reference, steps = _reference_single_rank(cfg)
    assert two.task == "causal-lm" and two.steps == steps > 30
    got, _ = ckpt.load(two.checkpoint)
    for key, value in reference.items():
        torch.testing.assert_close(got[f"model.{key}"], value, rtol=1e-3, atol=1e-4)
    assert two.val_perplexity is not None and two.tokens_per_s > 0 and two.mfu > 0 and len(two.samples) == 3

    arts = {a.key: a for a in artifacts_of(state.state_details.flow_run_id) if a.key}
    assert {"train-epochs", "train-curves", "train-samples"} <= set(arts)
    assert "tokens_per_s" in arts["train-epochs"].data and "mfu" in arts["train-epochs"].data
    assert "val_ppl" in arts["train-epochs"].data and "data_stall_share" in arts["train-epochs"].data
    assert "data:image/png;base64," in arts["train-curves"].data
    assert "continuation" in arts["train-samples"].data


def test_killed_rank_worker_resumes_lm_training(dask_cluster, text, tmp_path):
    """SIGKILL one rank's Dask worker mid-training: the group is retried, resumes, completes."""
    from flows.train import train_model

    common = dict(dataset=text, epochs=12, world_size=2, batch_size=8, checkpoint_every=8, seed=1,
                  model_args=TINY_GPT)
    result = train_with_a_rank_worker_killed(dask_cluster, TrainConfig(checkpoint_dir=str(tmp_path / "faulty"), **common))
    assert result.attempts >= 2 and result.resumed_from is not None
    assert result.epochs == 12
    clean = train_model(TrainConfig(checkpoint_dir=str(tmp_path / "clean"), **common))
    assert clean.attempts == 1
    assert result.val_perplexity == pytest.approx(clean.val_perplexity, rel=0.02)


def _pickle_only(folder) -> str:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return str(folder)


BAD_CASES = ["vocab", "context", "seq-len-over-data", "no-config", "no-weights", "pickle-only", "pickle-checkpoint"]


def _bad_case(case: str, tmp_path) -> tuple[list[str], dict, list[str]]:
    """CLI arguments, the same as TrainConfig fields, and what the one-line error must say."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    return {
        "vocab": (["--model-arg", "vocab_size=100"], {"model_args": {"vocab_size": 100}},
                  ["vocabulary of 258 tokens, larger than model 'gpt'", "(100)"]),
        "context": (["--model-arg", "seq_len=16"], {"model_args": {"seq_len": 16}},
                    ["--seq-len 32 is over model 'gpt''s context (16 positions)"]),
        "seq-len-over-data": (["--seq-len", "64"], {"seq_len": 64}, ["--seq-len 64 is not possible", "blocks hold 32 tokens"]),
        "no-config": (["--model", f"hf:{empty}"], {"model": f"hf:{empty}"},
                      [f"hf: model folder '{empty}' has no config.json"]),
        "no-weights": (["--model", f"hf:{tmp_path / 'weightless'}"], {"model": f"hf:{tmp_path / 'weightless'}"},
                       ["has no *.safetensors weights"]),
        "pickle-only": (["--model", f"hf:{tmp_path / 'pickled'}"], {"model": f"hf:{_pickle_only(tmp_path / 'pickled')}"},
                        ["holds only pickled weights (pytorch_model.bin)", "refused"]),
        "pickle-checkpoint": (["--init-from", str(tmp_path / "model.pt"), "--lora-rank", "4", "--lora-targets", "qkv"],
                              {"init_from": str(tmp_path / "model.pt"), "lora_rank": 4, "lora_targets": "qkv"},
                              ["is not a safetensors checkpoint", "refused"]),
    }[case]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_lm_input_is_refused_before_any_rank_starts(text, tmp_path, case):
    from storage.errors import ConfigError
    from tasks.training import prepare_training

    _, fields, needles = _bad_case(case, tmp_path)
    with pytest.raises(ConfigError) as info:
        prepare_training(TrainConfig(dataset=text, checkpoint_dir=str(tmp_path / "ck"), **fields))
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("case", ["vocab", "pickle-only"])
def test_bad_lm_input_on_the_cli_is_one_line_exit_2_and_writes_nothing(dask_cluster, text, tmp_path, case):
    args, _, needles = _bad_case(case, tmp_path)
    ck = tmp_path / "ck"
    proc = run_cli("train", text, "--checkpoint-dir", str(ck), "--epochs", "1", *args)
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in message, message
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
    assert not ck.exists() or not list(ck.glob("ckpt-*"))


def test_seq_len_of_one_is_refused_before_anything_runs(text, tmp_path):
    proc = run_cli("train", text, "--seq-len", "1", "--checkpoint-dir", str(tmp_path / "ck"))
    assert proc.returncode == 2 and "seq_len" in proc.stderr.replace("-", "_") and "Traceback" not in proc.stderr

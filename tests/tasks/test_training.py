"""Training as plain functions, in-process: models, LoRA, checkpoints, data order, errors."""

import json

import numpy as np
import pytest
import torch

from storage import checkpoint as ckpt
from storage.errors import ConfigError, IntegrityError, ManifestError
from tasks.models import build_model
from tasks.training import TrainConfig, prepare_training
from tasks.training.lora import LoRALinear, adapter_state, apply_lora, merge_lora
from tasks.training.rank import RankJob, train_rank
from tests.conftest import stage_plain


def _job(cfg: TrainConfig) -> RankJob:
    plan = prepare_training(cfg)
    return RankJob(cfg, plan.model_name, plan.model_args, plan.columns, resume_from=plan.resume_from)


def test_default_digits_training_is_accurate(digits_dataset, tmp_path):
    cfg = TrainConfig(dataset=digits_dataset, checkpoint_dir=str(tmp_path / "ck"))
    result = train_rank(_job(cfg))
    assert result.history[-1]["val_acc"] >= 0.95
    tensors, meta = ckpt.load(result.checkpoint)
    assert meta["model"]["name"] == "mlp" and meta["epoch"] == cfg.epochs
    assert {"epoch", "batches", "seed", "world_size"} <= set(meta["loader"])
    assert any(k.startswith("optim.") for k in tensors)


def test_resume_continues_exactly(digits_dataset, tmp_path):
    """Stop after 2 epochs, resume to 4: same weights as 4 epochs straight."""
    straight = train_rank(_job(TrainConfig(dataset=digits_dataset, epochs=4, checkpoint_dir=str(tmp_path / "a"))))
    cfg = TrainConfig(dataset=digits_dataset, epochs=2, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=7)
    train_rank(_job(cfg))
    resumed = train_rank(_job(cfg.model_copy(update={"epochs": 4})))
    assert resumed.resumed_from.endswith(f"ckpt-{straight.steps // 2:09d}")
    a, _ = ckpt.load(straight.checkpoint)
    b, _ = ckpt.load(resumed.checkpoint)
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key])


def test_resume_mid_epoch_from_step_checkpoint(digits_dataset, tmp_path):
    """A run that died after step 5 of epoch 0 resumes to the same weights as a straight run."""
    import shutil

    cfg = TrainConfig(dataset=digits_dataset, epochs=2, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=5,
                      keep_last=100)
    full = train_rank(_job(cfg))
    for folder in sorted((tmp_path / "a").glob("ckpt-*"))[1:]:
        shutil.rmtree(folder)
    meta = json.loads((tmp_path / "a" / "ckpt-000000005" / "meta.json").read_text())
    assert (meta["epoch"], meta["batch"]) == (0, 5)
    assert meta["loader"]["batches"] == 5 and meta["loader"]["dataset"].startswith("sha256:"), "the loader state is saved"
    resumed = train_rank(_job(cfg))
    assert resumed.resumed_from.endswith("ckpt-000000005")
    a, _ = ckpt.load(full.checkpoint)
    b, _ = ckpt.load(resumed.checkpoint)
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key])


def test_bf16_mixed_precision_trains(digits_dataset, tmp_path):
    cfg = TrainConfig(dataset=digits_dataset, precision="bf16-mixed", epochs=8, checkpoint_dir=str(tmp_path / "c"))
    assert train_rank(_job(cfg)).history[-1]["val_acc"] >= 0.9


def test_checkpoints_keep_last_and_are_atomic(tmp_path):
    root = str(tmp_path / "ck")
    for step in range(5):
        ckpt.save(root, step, {"w": torch.full((3,), float(step))}, {"note": step}, keep_last=2)
    assert [p.name for p in sorted((tmp_path / "ck").iterdir())] == ["ckpt-000000003", "ckpt-000000004"]
    # A checkpoint folder without meta.json (a crash mid-save) is not a checkpoint.
    (tmp_path / "ck" / "ckpt-000000009").mkdir()
    (tmp_path / "ck" / "ckpt-000000009" / "tensors.safetensors").write_bytes(b"partial")
    tensors, meta = ckpt.load(root)
    assert meta["step"] == 4 and tensors["w"][0] == 4


def test_checkpoint_corruption_and_pickles_refused(tmp_path):
    url = ckpt.save(str(tmp_path / "ck"), 1, {"w": torch.ones(100)}, {})
    blob = tmp_path / "ck" / "ckpt-000000001" / "tensors.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        ckpt.load(url)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="not a safetensors checkpoint"):
        ckpt.load(str(tmp_path / "model.pt"))
    with pytest.raises(ManifestError, match="no checkpoint"):
        ckpt.load(str(tmp_path / "empty"))


def test_lora_trains_only_adapters_and_merges_exactly(digits_dataset, tmp_path):
    base = train_rank(_job(TrainConfig(dataset=digits_dataset, epochs=3, checkpoint_dir=str(tmp_path / "base"))))
    cfg = TrainConfig(dataset=digits_dataset, epochs=2, init_from=base.checkpoint, lora_rank=4,
                      lora_targets=r"body\.\d+", checkpoint_dir=str(tmp_path / "lora"), lr=1e-2)
    result = train_rank(_job(cfg))
    base_t, _ = ckpt.load(base.checkpoint)
    lora_t, meta = ckpt.load(result.checkpoint)
    assert meta["lora"]["layers"] == ["body.0", "body.2"]
    for name in ("body.0.weight", "body.2.weight", "head.weight", "head.bias"):
        lora_name = name.replace("body.0.", "body.0.base.").replace("body.2.", "body.2.base.")
        torch.testing.assert_close(lora_t[f"model.{lora_name}"], base_t[f"model.{name}"], rtol=0, atol=0)
    assert lora_t["model.body.0.lora_b"].abs().sum() > 0, "adapters were trained"
    adapters, ameta = ckpt.load(str(tmp_path / "lora" / "adapters"))
    assert set(adapters) == {"body.0.lora_a", "body.0.lora_b", "body.2.lora_a", "body.2.lora_b"}
    assert ameta["base"] == base.checkpoint

    model = build_model("mlp", {"in_features": 64, "num_classes": 10})
    apply_lora(model, 4, 16.0, r"body\.\d+")
    model.load_state_dict({k[len("model."):]: v for k, v in lora_t.items() if k.startswith("model.")})
    x = torch.randn(32, 64)
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        after = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_changes_nothing():
    model = build_model("mlp", {"in_features": 64, "num_classes": 10})
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
        apply_lora(model, 2, 8.0, "head")
        torch.testing.assert_close(model(x), before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.lora_a", "head.lora_b"]
    assert set(adapter_state(model)) == {"head.lora_a", "head.lora_b"}


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_builtin_models_train_a_step(name):
    args = {"mlp": {"in_features": 64}, "cnn": {"in_channels": 1, "image_size": 8},
            "transformer": {"vocab_size": 50, "seq_len": 12, "num_classes": 3}}[name]
    model = build_model(name, args)
    x = torch.randint(0, 50, (4, 12)) if name == "transformer" else torch.randn(4, 64)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ bad input


def test_bad_model_inputs(digits_dataset, tmp_path):
    def prepare(**kw):
        kw.setdefault("checkpoint_dir", str(tmp_path / "never"))
        return prepare_training(TrainConfig(dataset=digits_dataset, **kw))

    with pytest.raises(ConfigError, match="unknown model 'resnet9000'; built-ins: cnn, gpt, mlp, transformer"):
        prepare(model="resnet9000")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.models'"):
        prepare(model="no_such_pkg.models:build")
    with pytest.raises(ConfigError, match="has no callable 'nothing_here'"):
        prepare(model="tasks.models.mlp:nothing_here")
    with pytest.raises(ConfigError, match="rejected its arguments"):
        prepare(model="mlp", model_args={"depth": 3})
    with pytest.raises(ConfigError, match="cannot take column 'image'"):
        prepare(model="mlp", model_args={"in_features": 10})
    with pytest.raises(ConfigError, match="no label column 'target'"):
        prepare(label_column="target")
    with pytest.raises(ConfigError, match="not a safetensors checkpoint"):
        (tmp_path / "weights.pt").write_bytes(b"\x80\x04junk")
        prepare(init_from=str(tmp_path / "weights.pt"))
    assert not (tmp_path / "never").exists(), "no checkpoint is written for bad input"


def test_dataset_without_needed_columns(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,c\n1,2,x\n3,4,y\n")
    stage_plain(source=str(tmp_path / "t.csv"), dest=str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match="no label column 'label' \\(columns: a, b, c\\)"):
        prepare_training(TrainConfig(dataset=str(tmp_path / "ds")))
    with pytest.raises(ConfigError, match="feature column 'c' .* is string"):
        prepare_training(TrainConfig(dataset=str(tmp_path / "ds"), label_column="a", feature_column="c"))


def test_bad_train_parameters():
    from pydantic import ValidationError

    for kwargs, message in [
        ({"precision": "fp8"}, "precision"),
        ({"epochs": 0}, "epochs"),
        ({"lora_rank": 4}, "both lora_rank and lora_targets"),
        ({"lora_rank": 4, "lora_targets": "x"}, "give init_from"),
        ({"world_size": 0}, "world_size"),
    ]:
        with pytest.raises(ValidationError, match=message):
            TrainConfig(dataset="/tmp/x", **kwargs)


def test_lm_only_optimizer_options_are_refused_for_classifiers(digits_dataset, tmp_path):
    """Accumulation, clipping and the LR schedule act on causal LMs only: a classifier run that
    asks for them is refused by name instead of silently ignoring them."""
    from tasks.training import TrainConfig, prepare_training

    for kw, flag in (({"grad_accum": 2}, "--grad-accum"), ({"grad_clip": 1.0}, "--grad-clip"),
                     ({"lr_schedule": "cosine"}, "--lr-schedule cosine"), ({"warmup_steps": 5}, "--warmup-steps")):
        with pytest.raises(ConfigError, match=f"{flag}.*causal-LM training only"):
            prepare_training(TrainConfig(dataset=digits_dataset, checkpoint_dir=str(tmp_path / "never"), **kw))
    assert not (tmp_path / "never").exists()

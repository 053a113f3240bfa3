"""The training step without host round trips (tasks.training.step): the same parameters and
metrics as the plain synced loop, in training and across a mid-epoch resume; CUDA graphs and
torch.compile on a GPU (marked gpu)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from storage import checkpoint as ckpt
from tasks.models import build_model
from tasks.training import TrainConfig, prepare_training
from tasks.training.data import train_loader
from tasks.training.rank import RankJob, _restore_optimizer, _optimizer_tensors, train_rank
from tasks.training.step import TrainStep, classification_loss, make_optimizer, resolve_capture

CPU = torch.device("cpu")
MODELS = {"mlp": ("mlp", {"in_features": 64, "num_classes": 10}, (64,)),
          "cnn": ("cnn", {"channels": [4, 8], "image_size": 8, "in_channels": 3, "hidden": 16}, (3, 8, 8))}


def _job(cfg: TrainConfig) -> RankJob:
    plan = prepare_training(cfg)
    return RankJob(cfg, plan.model_name, plan.model_args, plan.columns, resume_from=plan.resume_from)


def _batches(shape, n=6, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, *shape, generator=g), "y": torch.randint(0, 10, (batch,), generator=g)}
            for _ in range(n)]


def _plain(model, optimizer, batches, amp_dtype=None):
    """The loop as it was: a .item() per step."""
    loss_sum = correct = seen = 0.0
    for batch in batches:
        with torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else torch.autocast("cpu", enabled=False):
            logits = model(batch["x"])
            loss = F.cross_entropy(logits.float(), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(batch["y"])
        correct += (logits.argmax(1) == batch["y"]).sum().item()
        seen += len(batch["y"])
    return {"loss": loss_sum, "acc": correct, "count": seen}


def _pair(name):
    kind, args, shape = MODELS[name]
    torch.manual_seed(0)
    a = build_model(kind, args)
    b = build_model(kind, args)
    b.load_state_dict(a.state_dict())
    return a, b, shape


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_step_gives_the_plain_loops_parameters_and_metrics(name, amp):
    plain_model, model, shape = _pair(name)
    batches = _batches(shape)
    expected = _plain(plain_model, torch.optim.AdamW(plain_model.parameters(), lr=3e-3, weight_decay=0.0), batches, amp)
    step = TrainStep(model, model, make_optimizer(model.parameters(), 3e-3, 0.0, CPU, "none"),
                     classification_loss("x", "y"), device=CPU, amp_dtype=amp)
    for i, batch in enumerate(batches):
        step(batch)
        if i == 2:
            first = step.read()
            assert first["steps"] == 3 and first["count"] == 96
    rest = step.read()
    got = {k: first[k] + rest[k] for k in ("loss", "acc", "count")}
    assert got["count"] == expected["count"] and got["acc"] == expected["acc"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    for (key, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    assert step.read() == {"loss": 0.0, "acc": 0.0, "steps": 0}, "read resets the sums"


def test_a_loss_function_is_pluggable():
    """Any (model, batch) -> (loss, sums) works: here a token count known on the host and a device sum."""
    model = torch.nn.Linear(4, 1)

    def regression(net, batch):
        loss = F.mse_loss(net(batch["x"]).squeeze(1), batch["t"])
        return loss, {"sq": loss.detach() * len(batch["t"]), "count": len(batch["t"])}

    step = TrainStep(model, model, torch.optim.SGD(model.parameters(), lr=0.1), regression, device=CPU)
    for _ in range(4):
        step({"x": torch.randn(8, 4), "t": torch.randn(8)})
    sums = step.read()
    assert sums["count"] == 32 and sums["steps"] == 4 and sums["sq"] > 0


def test_capture_choice():
    cuda = torch.device("cuda", 0)
    assert resolve_capture(None, "graph", CPU, 1, False) == "none", "off on CPU by default (measured slower)"
    assert resolve_capture(True, "graph", CPU, 1, False) == "compile", "no CUDA graphs on CPU"
    assert resolve_capture(None, "graph", cuda, 1, False) == "graph"
    assert resolve_capture(None, "graph", cuda, 2, False) == "compile", "DDP: compile"
    assert resolve_capture(None, "graph", cuda, 1, True) == "compile", "fp16 grad scaler: compile"
    assert resolve_capture(False, "graph", cuda, 1, False) == "none"
    with pytest.raises(ValueError, match="capture='graph' needs a CUDA device"):
        TrainStep(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None, None, device=CPU, capture="graph")


def test_a_checkpoint_from_a_fused_optimizer_restores_on_this_device():
    model = torch.nn.Linear(4, 2)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(torch.randn(3, 4)).sum().backward()
    saved.step()
    tensors, meta = _optimizer_tensors(saved)
    mine = make_optimizer(model.parameters(), 1e-3, 0.0, CPU, "none")
    _restore_optimizer(mine, tensors, meta)
    assert not mine.param_groups[0]["fused"] and not mine.param_groups[0]["capturable"]
    torch.testing.assert_close(mine.state[model.weight]["exp_avg"], saved.state[model.weight]["exp_avg"])


def test_restored_moments_take_a_channels_last_models_layout():
    model = torch.nn.Conv2d(3, 8, 3)
    first = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    first.step()
    tensors, meta = _optimizer_tensors(first)
    model.to(memory_format=torch.channels_last)
    mine = torch.optim.AdamW(model.parameters())
    _restore_optimizer(mine, tensors, meta)
    moment = mine.state[model.weight]["exp_avg"]
    assert moment.stride() == model.weight.stride() and torch.equal(moment, first.state[model.weight]["exp_avg"])


def _weights(url):
    tensors, _ = ckpt.load(url)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_metrics_read_every_n_steps_equal_the_synced_path(digits_dataset, tmp_path):
    every = train_rank(_job(TrainConfig(dataset=digits_dataset, epochs=2, sync_every=1,
                                        checkpoint_dir=str(tmp_path / "a"))))
    rarely = train_rank(_job(TrainConfig(dataset=digits_dataset, epochs=2, sync_every=7,
                                         checkpoint_dir=str(tmp_path / "b"))))
    for a, b in zip(every.history, rarely.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5) and a["train_acc"] == b["train_acc"]
    for key, value in _weights(every.checkpoint).items():
        torch.testing.assert_close(value, _weights(rarely.checkpoint)[key])


def test_device_batches_train_and_resume_mid_epoch_like_the_host_path(digits_dataset, tmp_path):
    """Device-gathered batches (on CPU here) give the host path's weights, also after a mid-epoch resume."""
    host = train_rank(_job(TrainConfig(dataset=digits_dataset, epochs=2, device_batches="host",
                                       checkpoint_dir=str(tmp_path / "host"))))
    cfg = TrainConfig(dataset=digits_dataset, epochs=2, device_batches="device", checkpoint_every=5, keep_last=100,
                      checkpoint_dir=str(tmp_path / "device"))
    plan = prepare_training(cfg)
    assert train_loader(cfg, plan.columns, 0, 1, CPU).gather == "device"
    assert train_loader(cfg.model_copy(update={"device_batches": "auto"}), plan.columns, 0, 1, CPU).gather == "host"
    full = train_rank(_job(cfg))
    for key, value in _weights(host.checkpoint).items():
        torch.testing.assert_close(value, _weights(full.checkpoint)[key])
    for folder in sorted((tmp_path / "device").glob("ckpt-*"))[1:]:
        shutil.rmtree(folder)
    resumed = train_rank(_job(cfg))
    assert resumed.resumed_from.endswith("ckpt-000000005")
    for key, value in _weights(full.checkpoint).items():
        torch.testing.assert_close(value, _weights(resumed.checkpoint)[key])


# ---------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("capture", ["graph", "compile"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_captured_steps_on_cuda_equal_eager(name, amp, capture):
    cuda = torch.device("cuda")
    eager_model, model, shape = _pair(name)
    batches = [{k: v.to(cuda) for k, v in b.items()} for b in _batches(shape, n=8)]
    batches += [{k: v[:16] for k, v in batches[0].items()}, batches[1]]  # a short batch runs eagerly, then replays
    results = []
    for m, mode in ((eager_model, "none"), (model, capture)):
        m.to(cuda)
        step = TrainStep(m, m, make_optimizer(m.parameters(), 3e-3, 0.0, cuda, mode), classification_loss("x", "y"),
                         device=cuda, capture=mode, amp_dtype=amp)
        for batch in batches:
            step(batch)
        results.append(step.read())
    tol = {"rtol": 2e-2, "atol": 2e-2} if amp else {"rtol": 1e-4, "atol": 1e-5}
    assert results[0]["count"] == results[1]["count"] == 9 * 32 + 16 and results[1]["steps"] == 10
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=tol["rtol"])
    for (key, a), b in zip(eager_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key, **tol)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_and_device_batches_on_cuda_resume_mid_epoch(digits_dataset, tmp_path):
    plain = train_rank(_job(TrainConfig(dataset=digits_dataset, epochs=2, compile=False, device_batches="host",
                                        checkpoint_dir=str(tmp_path / "plain"))))
    cfg = TrainConfig(dataset=digits_dataset, epochs=2, compile=True, device_batches="device", checkpoint_every=5,
                      keep_last=100, checkpoint_dir=str(tmp_path / "fast"))
    fast = train_rank(_job(cfg))
    for key, value in _weights(plain.checkpoint).items():
        torch.testing.assert_close(value, _weights(fast.checkpoint)[key], rtol=1e-4, atol=1e-5)
    for folder in sorted((tmp_path / "fast").glob("ckpt-*"))[1:]:
        shutil.rmtree(folder)
    resumed = train_rank(_job(cfg))
    for key, value in _weights(fast.checkpoint).items():
        torch.testing.assert_close(value, _weights(resumed.checkpoint)[key], rtol=1e-4, atol=1e-5)

"""Optimization as plain functions: each step on the built-in models, artifacts, the gate, bad input."""

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from storage import checkpoint as ckpt
from storage.errors import ConfigError, DestinationError
from storage.hashing import sealed_json
from tasks.models import build_model
from tasks.models.loading import load_model
from tasks.optimize import OptimizeConfig, optimize, prepare_optimization
from tasks.optimize.pipeline import apply_steps
from tasks.optimize.precision import CastInputs
from tasks.optimize.prune import prune_structured, prune_unstructured
from tasks.optimize.quantize import Int8Linear
from tasks.optimize.report import best_seconds
from tests.conftest import stage_plain

TOKENS = {"vocab_size": 64, "seq_len": 16, "num_classes": 4, "d_model": 32, "n_heads": 4, "d_ff": 64}
ARGS = {"mlp": {"in_features": 64, "num_classes": 10}, "cnn": {"in_channels": 1, "image_size": 8, "num_classes": 10},
        "transformer": TOKENS}
DIGITS_COLUMNS = {"feature": "image", "label": "label", "shape": [1, 8, 8], "scale": None}
TOKEN_COLUMNS = {"feature": "tokens", "label": "label", "shape": None, "scale": None}
# Parameters left after structured pruning of half the units: the transformer keeps its
# embeddings and attention whole (only the FFN width is pruned).
HALVED_PARAMETERS = {"mlp": 0.7, "cnn": 0.7, "transformer": 0.85}


def _inputs(name: str, n: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 64, (n, 16)) if name == "transformer" else torch.rand(n, 64)


def _save_checkpoint(root, name: str, model=None, columns=None, lora=None) -> str:
    """A training-format checkpoint of ``model`` (default: a fresh built-in)."""
    torch.manual_seed(0)
    model = model if model is not None else build_model(name, ARGS[name])
    columns = columns or (TOKEN_COLUMNS if name == "transformer" else DIGITS_COLUMNS)
    return ckpt.save(str(root), 1, {f"model.{k}": v for k, v in model.state_dict().items()},
                     {"model": {"name": name, "args": ARGS[name]}, "columns": columns, "lora": lora})


@pytest.fixture(scope="module")
def tokens_dataset(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("tokens") / "ds")
    stage_plain(source="synthetic-tokens?rows=256&seq_len=16&vocab=64&classes=4", dest=dest, val_fraction=0.25)
    return dest


def _optimize(checkpoint: str, dataset: str, output, **steps):
    cfg = OptimizeConfig(checkpoint=checkpoint, eval_dataset=dataset, output=str(output), **steps)
    return cfg, optimize(cfg, prepare_optimization(cfg))


# ------------------------------------------------------------------ quantization


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight-only"])
def test_int8_digits_model_passes_the_gate_and_round_trips(digits_checkpoint, digits_dataset, tmp_path, mode):
    cfg, result = _optimize(digits_checkpoint, digits_dataset, tmp_path / "q", quantize=mode)
    assert result.passed and result.output == str(tmp_path / "q")
    assert result.accuracy_drop <= 1.0 and result.after["accuracy"] >= 0.95
    assert result.after["size_bytes"] <= 0.3 * result.before["size_bytes"]
    assert result.after["parameters"] == result.before["parameters"]
    assert [s["step"] for s in result.steps] == ["quantize"]
    assert result.steps[0]["layers"] == ["body.0", "body.2", "head"]

    loaded = load_model(str(tmp_path / "q"))
    assert loaded.name == "mlp" and not loaded.model.training
    assert loaded.columns == load_model(digits_checkpoint).columns and loaded.columns["feature"] == "image"
    assert all(isinstance(loaded.model.get_submodule(n), Int8Linear) for n in ("body.0", "body.2", "head"))
    tensors, _ = ckpt.load(str(tmp_path / "q"), formats=(ckpt.MODEL_FORMAT_ID,))
    assert tensors["model.head.weight_int8"].dtype == torch.int8
    x = torch.rand(16, 64)
    reference = apply_steps(cfg, load_model(digits_checkpoint))[0]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight-only"])
@pytest.mark.parametrize("in_features", [64, 37], ids=["packed-kernel", "fallback"])
def test_int8_linear_matches_dequantized_reference(mode, in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 24)
    layer = Int8Linear.from_linear(linear, mode)
    dequantized = layer.weight_int8.float() * layer.weight_scale[:, None]
    assert (dequantized - linear.weight).abs().max() <= layer.weight_scale.max() / 2 + 1e-6
    x = torch.randn(3, 5, in_features)  # 3-D inputs (a transformer's) keep their shape
    with torch.inference_mode():
        y = layer(x)
        expected = torch.nn.functional.linear(x, dequantized, linear.bias)
    assert y.shape == (3, 5, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_transformer_quantizes_its_ffn_and_head(tmp_path, tokens_dataset):
    checkpoint = _save_checkpoint(tmp_path / "ck", "transformer")
    cfg, result = _optimize(checkpoint, tokens_dataset, tmp_path / "q", quantize="int8-dynamic",
                            max_accuracy_drop=100)
    assert result.steps[0]["layers"] == ["encoder.layers.0.linear1", "encoder.layers.0.linear2",
                                         "encoder.layers.1.linear1", "encoder.layers.1.linear2", "head"]
    loaded = load_model(result.output)
    x = _inputs("transformer")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), apply_steps(cfg, load_model(checkpoint))[0](x), rtol=0, atol=0)
        fp32 = load_model(checkpoint).model(x)
        assert (loaded.model(x) - fp32).abs().max() < 0.05 * fp32.abs().max()


# ------------------------------------------------------------------ pruning


def _kill_half_the_units(name: str, model) -> None:
    """Zero the weights and biases that produce every other unit: those units only ever output 0."""
    layers = {"mlp": lambda: [m for m in model.body if isinstance(m, torch.nn.Linear)],
              "cnn": lambda: [m for m in model.features if isinstance(m, torch.nn.Conv2d)] + [model.fc],
              "transformer": lambda: [layer.linear1 for layer in model.encoder.layers]}[name]()
    with torch.no_grad():
        for layer in layers:
            layer.weight[1::2] = 0
            layer.bias[1::2] = 0


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_structured_pruning_removes_exactly_the_dead_units(name):
    """With every other unit dead, pruning half keeps the live ones: same outputs, half the width."""
    torch.manual_seed(0)
    model = build_model(name, ARGS[name]).eval()
    _kill_half_the_units(name, model)
    x = _inputs(name)
    with torch.inference_mode():
        before = model(x)
    pruned, args = prune_structured(name, ARGS[name], model, 0.5)
    expected = {"mlp": {"hidden": [64, 32]}, "cnn": {"channels": [8, 16], "hidden": 32}, "transformer": {"d_ff": 32}}
    assert args == {**ARGS[name], **expected[name]}
    assert sum(p.numel() for p in pruned.parameters()) < HALVED_PARAMETERS[name] * sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(pruned(x), before, rtol=1e-5, atol=1e-5)


def test_structured_pruning_makes_a_wide_mlp_faster():
    """75% of the units gone is ~10x fewer multiply-adds; best-of-N timing shows it on a busy machine."""
    torch.manual_seed(0)
    args = {"in_features": 256, "hidden": [1024, 1024], "num_classes": 10}
    model = build_model("mlp", args).eval()
    pruned, new_args = prune_structured("mlp", args, model, 0.75)
    assert new_args["hidden"] == [256, 256]
    macs = lambda h: 256 * h[0] + h[0] * h[1] + h[1] * 10  # noqa: E731
    assert macs(new_args["hidden"]) < 0.11 * macs(args["hidden"])
    x = torch.rand(64, 256)
    with torch.inference_mode():
        for _ in range(3):  # the margin is ~10x; a retry only guards against a machine stalled throughout
            if best_seconds(lambda: pruned(x)) < best_seconds(lambda: model(x)):
                break
        else:
            pytest.fail("the structurally pruned MLP was never faster than the original")


def test_unstructured_pruning_is_global_and_exact():
    torch.manual_seed(0)
    model = build_model("cnn", ARGS["cnn"])
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    total = sum(w.numel() for w in weights)
    biases = {n: p.clone() for n, p in model.named_parameters() if n.endswith("bias")}
    assert prune_unstructured(model, 0.6) == int(0.6 * total)
    assert sum(int((w == 0).sum()) for w in weights) == int(0.6 * total)
    sparsity = [float((w == 0).float().mean()) for w in weights]
    assert max(sparsity) - min(sparsity) > 0.1, "one global threshold: layers end up with different sparsity"
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p, biases[n])


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_pruned_and_quantized_artifact_round_trips(name, tmp_path, digits_dataset, tokens_dataset):
    dataset = tokens_dataset if name == "transformer" else digits_dataset
    checkpoint = _save_checkpoint(tmp_path / "ck", name)
    cfg, result = _optimize(checkpoint, dataset, tmp_path / "out", prune=0.5, structured=True,
                            quantize="int8-dynamic", max_accuracy_drop=100)
    assert result.after["parameters"] < HALVED_PARAMETERS[name] * result.before["parameters"]
    assert result.after["size_bytes"] < {"mlp": 0.3, "cnn": 0.3, "transformer": 0.7}[name] * result.before["size_bytes"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format"] == "swarm-model" and [s["step"] for s in meta["optimizations"]] == ["prune", "quantize"]
    assert meta["model"]["args"] == result.model_args != ARGS[name]
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.args == result.model_args and loaded.columns == meta["columns"]
    x = _inputs(name)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), apply_steps(cfg, load_model(checkpoint))[0](x), rtol=0, atol=0)


# ------------------------------------------------------------------ precision and LoRA


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_cast_model_takes_fp32_inputs_and_round_trips(name, dtype, tmp_path, digits_dataset, tokens_dataset):
    dataset = tokens_dataset if name == "transformer" else digits_dataset
    checkpoint = _save_checkpoint(tmp_path / "ck", name)
    _, result = _optimize(checkpoint, dataset, tmp_path / "out", dtype=dtype, max_accuracy_drop=100)
    assert result.after["size_bytes"] < 0.55 * result.before["size_bytes"]
    loaded = load_model(result.output)
    assert isinstance(loaded.model, CastInputs) and not loaded.model.training
    assert next(loaded.model.inner.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = _inputs(name)
    with torch.inference_mode():
        y = loaded.model(x)
        fp32 = load_model(checkpoint).model(x)
    assert y.dtype == torch.float32
    assert (y - fp32).abs().max() < 0.05 * fp32.abs().max() + 0.05
    if name == "mlp":
        with torch.inference_mode():  # integer pixels, as a raw uint8 image column would give
            assert loaded.model(torch.randint(0, 16, (2, 64))).dtype == torch.float32


def test_merge_lora_folds_adapters_exactly(tmp_path, digits_dataset):
    from tasks.training.lora import apply_lora

    torch.manual_seed(0)
    model = build_model("mlp", ARGS["mlp"])
    layers = apply_lora(model, 4, 16.0, r"body\.\d+")
    for name in layers:
        torch.nn.init.normal_(model.get_submodule(name).lora_b, std=0.05)
    lora = {"rank": 4, "alpha": 16.0, "targets": r"body\.\d+", "layers": layers}
    checkpoint = _save_checkpoint(tmp_path / "ck", "mlp", model=model, lora=lora)
    _, result = _optimize(checkpoint, digits_dataset, tmp_path / "out", merge_lora=True)
    assert result.accuracy_drop == 0 and result.steps == [{"step": "merge-lora", "layers": ["body.0", "body.2"]}]
    tensors, _ = ckpt.load(result.output, formats=(ckpt.MODEL_FORMAT_ID,))
    assert not any("lora" in k for k in tensors)
    x = _inputs("mlp")
    with torch.inference_mode():
        torch.testing.assert_close(load_model(result.output).model(x), load_model(checkpoint).model(x),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the gate


def test_gate_refuses_a_model_pruned_to_ruin(digits_checkpoint, digits_dataset, tmp_path):
    _, result = _optimize(digits_checkpoint, digits_dataset, tmp_path / "ruin", prune=0.99)
    assert not result.passed and result.output is None
    assert result.accuracy_drop > 50 and result.after["nonzeros"] < 0.03 * result.before["nonzeros"]
    assert "quality gate: accuracy fell" in result.gate_message() and "nothing was written" in result.gate_message()
    assert not (tmp_path / "ruin").exists()


def test_gate_replaces_an_earlier_artifact_only_when_it_passes(digits_checkpoint, digits_dataset, tmp_path):
    _optimize(digits_checkpoint, digits_dataset, tmp_path / "out", quantize="int8-dynamic")
    before = (tmp_path / "out" / "meta.json").read_bytes()
    _, result = _optimize(digits_checkpoint, digits_dataset, tmp_path / "out", prune=0.99)
    assert not result.passed and (tmp_path / "out" / "meta.json").read_bytes() == before
    _, result = _optimize(digits_checkpoint, digits_dataset, tmp_path / "out", dtype="bf16")
    assert result.passed and isinstance(load_model(str(tmp_path / "out")).model, CastInputs)


# ------------------------------------------------------------------ bad input


def test_bad_optimize_parameters():
    base = {"checkpoint": "/tmp/ck", "eval_dataset": "/tmp/ds", "output": "/tmp/out"}
    for kwargs, message in [
        ({"quantize": "int4"}, "quantize"),
        ({"distill": True}, "distill"),
        ({"prune": 0}, "greater than 0"),
        ({"prune": 1}, "less than 1"),
        ({"prune": 1.5}, "less than 1"),
        ({"prune": -0.1}, "greater than 0"),
        ({"dtype": "fp8"}, "dtype"),
        ({}, "nothing to do"),
        ({"structured": True}, "structured pruning needs an amount"),
        ({"quantize": "int8-dynamic", "dtype": "bf16"}, "alternatives"),
        ({"quantize": "int8-dynamic", "max_accuracy_drop": -1}, "max_accuracy_drop"),
    ]:
        with pytest.raises(ValidationError, match=message):
            OptimizeConfig(**base, **kwargs)
    assert OptimizeConfig(**base, dtype="bf16", prune=0.2, merge_lora=True).steps == ["merge-lora", "prune", "cast"]


def _refused(exc_type, match, **kwargs):
    with pytest.raises(exc_type, match=match):
        prepare_optimization(OptimizeConfig(**kwargs))


def test_bad_checkpoints_are_refused_before_any_output(digits_checkpoint, digits_dataset, tmp_path, monkeypatch):
    out = tmp_path / "never"
    common = {"eval_dataset": digits_dataset, "output": str(out), "quantize": "int8-dynamic"}
    other = tmp_path / "other" / "ckpt-000000001"
    shutil.copytree(digits_checkpoint, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["model"]["args"]["hidden"] = [32]  # the tensors are of a [128, 64] MLP
    (other / "meta.json").write_bytes(sealed_json(meta))  # crafted: the checksum matches
    _refused(ConfigError, r"do not fit model 'mlp' with arguments .*hidden.*: \[32\]", checkpoint=str(other), **common)
    (tmp_path / "model.pt").write_bytes(b"\x80\x04junk")
    _refused(ConfigError, "not a safetensors checkpoint", checkpoint=str(tmp_path / "model.pt"), **common)
    _refused(ConfigError, "has no LoRA adapters", checkpoint=digits_checkpoint, eval_dataset=digits_dataset,
             output=str(out), merge_lora=True)
    factory = _save_checkpoint(tmp_path / "user", "mlp")
    meta_path = next((tmp_path / "user").glob("ckpt-*")) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["name"] = "tasks.models.mlp:build"
    meta_path.write_bytes(sealed_json(meta))
    monkeypatch.setenv("SWARM_TRUSTED_MODEL_MODULES", "tasks.models")  # else refused when loading
    _refused(ConfigError, "structured pruning knows .* not 'tasks.models.mlp:build'", checkpoint=factory,
             eval_dataset=digits_dataset, output=str(out), prune=0.5, structured=True)
    assert not out.exists()


def test_lora_checkpoint_needs_merge_and_artifacts_are_not_reoptimized(digits_checkpoint, digits_dataset, tmp_path):
    from tasks.training.lora import apply_lora

    model = build_model("mlp", ARGS["mlp"])
    layers = apply_lora(model, 2, 8.0, "head")
    checkpoint = _save_checkpoint(tmp_path / "ck", "mlp", model=model,
                                  lora={"rank": 2, "alpha": 8.0, "targets": "head", "layers": layers})
    _refused(ConfigError, "has LoRA adapters on head: add --merge-lora", checkpoint=checkpoint,
             eval_dataset=digits_dataset, output=str(tmp_path / "out"), quantize="int8-dynamic")
    _, result = _optimize(digits_checkpoint, digits_dataset, tmp_path / "q", quantize="int8-dynamic")
    _refused(ConfigError, "already an optimized model", checkpoint=result.output, eval_dataset=digits_dataset,
             output=str(tmp_path / "again"), prune=0.5)
    assert not (tmp_path / "out").exists() and not (tmp_path / "again").exists()


def test_bad_eval_datasets_and_outputs(digits_checkpoint, digits_dataset, tokens_dataset, tmp_path):
    out = tmp_path / "never"
    common = {"checkpoint": digits_checkpoint, "output": str(out), "quantize": "int8-dynamic"}
    _refused(ConfigError, r"model 'mlp' .* cannot take column 'tokens' of .* \(rows of \(16,\) values\)",
             eval_dataset=tokens_dataset, feature_column="tokens", **common)
    (tmp_path / "unlabelled.csv").write_text("a,b\n1,2\n3,4\n")
    stage_plain(source=str(tmp_path / "unlabelled.csv"), dest=str(tmp_path / "unlabelled"))
    _refused(ConfigError, r"no label column 'label' \(columns: a, b\)", eval_dataset=str(tmp_path / "unlabelled"),
             **common)
    _refused(ConfigError, r"eval split 'test' is not in .* \(splits: train, val\)", eval_dataset=digits_dataset,
             eval_split="test", **common)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    _refused(DestinationError, "is a file", eval_dataset=digits_dataset, **{**common, "output": str(tmp_path / "file")})
    _refused(DestinationError, "holds a swarm-checkpoint folder", eval_dataset=digits_dataset,
             **{**common, "output": digits_checkpoint})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _refused(DestinationError, "folder with other files", eval_dataset=digits_dataset,
             **{**common, "output": str(tmp_path / "busy")})

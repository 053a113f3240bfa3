"""The CPU kernel choice: oneDNN only where it converts and matches eager; remembered per model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.inference import kernels
from tasks.inference.kernels import EAGER, ONEDNN, ONEDNN_LAYERS, fastest_forward
from tasks.models import build_model

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", {"in_features": 64, "hidden": [512, 512]}).eval()


@needs_onednn
@pytest.mark.parametrize("name,args,shape", [
    ("mlp", {"in_features": 64, "hidden": [512, 512]}, (64,)),
    ("cnn", {"in_channels": 1, "image_size": 8}, (1, 8, 8)),
])
def test_onednn_path_gives_the_eager_outputs(name, args, shape):
    torch.manual_seed(0)
    model = build_model(name, args).eval()
    paths = kernels._onednn(model)
    assert set(paths) == {ONEDNN, ONEDNN_LAYERS}
    with torch.inference_mode():
        for rows in (1, 7, 64):
            x = torch.rand(rows, *shape)
            expected = model(x)
            for fast in paths.values():
                got = fast(x)
                assert got.layout == torch.strided and got.shape == expected.shape
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # the conversion works on a copy: the caller's model is untouched
    assert all(p.layout == torch.strided for p in model.parameters())
    assert all(type(m) is not torch.utils.mkldnn.MkldnnLinear for m in model.modules())


@needs_onednn
def test_whichever_path_is_chosen_it_predicts_like_the_model():
    model = _wide_mlp()
    x = torch.rand(32, 64)
    forward, kernel = fastest_forward(model, x, "cpu")
    assert kernel in (EAGER, ONEDNN, ONEDNN_LAYERS)
    with torch.inference_mode():
        torch.testing.assert_close(forward(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(forward(x[:3]), model(x[:3]), rtol=1e-4, atol=1e-5)


class _Scaled(nn.Linear):
    """A Linear subclass with its own forward, as LoRA and int8 layers are: never converted."""

    def forward(self, x):
        return 2 * super().forward(x)


class _Viewing(nn.Module):
    """A forward that oneDNN tensors cannot run (``view``); dense between layers it can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))


@pytest.mark.parametrize("model", [
    nn.Sequential(_Scaled(16, 4)),
    nn.Sequential(nn.Linear(16, 4)).to(torch.bfloat16),
    nn.Sequential(nn.Embedding(10, 16), nn.Flatten(), nn.Linear(16, 4)),
], ids=["subclassed-layer", "bf16", "embedding"])
def test_models_outside_onednn_stay_eager_without_a_try(model, monkeypatch):
    monkeypatch.setattr(kernels, "_measure", lambda *a: pytest.fail("measured a model oneDNN cannot take"))
    forward, kernel = fastest_forward(model.eval(), torch.zeros(4, 16), "cpu")
    assert (forward, kernel) == (model, EAGER)


@needs_onednn
def test_paths_that_fail_or_differ_are_never_chosen():
    model, x = _Viewing().eval(), torch.rand(8, 16)
    paths = kernels._onednn(model)
    with pytest.raises(Exception):
        paths[ONEDNN](x)  # the view: oneDNN tensors have no strides
    assert kernels._measure({EAGER: model, ONEDNN: paths[ONEDNN]}, x) == EAGER
    assert kernels._measure({EAGER: model, ONEDNN_LAYERS: lambda t: model(t) + 1e-3}, x) == EAGER
    assert kernels._measure({EAGER: model, ONEDNN_LAYERS: lambda t: model(t)[:-1]}, x) == EAGER
    _, kernel = fastest_forward(model, x, "cpu")
    assert kernel in (EAGER, ONEDNN_LAYERS)


@needs_onednn
def test_the_choice_is_remembered_per_model_device_and_probe(monkeypatch):
    calls = []
    real = kernels._measure
    monkeypatch.setattr(kernels, "_measure", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "_CHOICES", {})
    model, x = _wide_mlp(), torch.rand(16, 64)
    first = fastest_forward(model, x, "cpu", key=("model-url", "hash-1"))[1]
    again = fastest_forward(_wide_mlp(), x, "cpu", key=("model-url", "hash-1"))[1]
    assert (len(calls), again) == (1, first)
    fastest_forward(model, x[:4], "cpu", key=("model-url", "hash-1"))  # another probe size: measured anew
    fastest_forward(model, x, "cpu", key=("model-url", "hash-2"))  # other weights: measured anew
    assert len(calls) == 3

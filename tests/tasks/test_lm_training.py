"""Causal-LM training in-process: loss masking, hf: models, checkpoints and exact resume, LoRA."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from storage import checkpoint as ckpt
from tasks.training import TrainConfig, prepare_training
from tasks.training.rank import RankJob, train_rank
from tests.lm_data import text_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY_GPT = {"d_model": 32, "n_layers": 2, "n_heads": 2}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return text_dataset(str(tmp_path_factory.mktemp("lm") / "text"))


def tiny_hf(folder, family: str, vocab: int = 258, context: int = 64) -> str:
    """A tiny randomly initialised transformers model, saved as a user's folder would be."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=32, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                                          bos_token_id=0, eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_folder(request, tmp_path_factory) -> str:
    return tiny_hf(tmp_path_factory.mktemp(request.param) / request.param, request.param)


def run(cfg: TrainConfig):
    plan = prepare_training(cfg)
    return train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns, lm=plan.lm))


# --------------------------------------------------------------------------- masking


def test_no_loss_term_predicts_across_a_document_boundary_or_from_padding():
    from tasks.training.lm import LMSpec, lm_forward, targets_and_mask

    eot, pad = 0, 1
    # doc A = 5 6 7, EOT, doc B = 8 9, EOT, pad pad: the boundary falls mid-block.
    block = torch.tensor([[5, 6, 7, eot, 8, 9, eot, pad, pad]])
    inputs, targets, keep = targets_and_mask(block, eot, pad)
    kept = {(int(i), int(t)) for i, t, k in zip(inputs[0], targets[0], keep[0]) if k}
    assert kept == {(5, 6), (6, 7), (7, eot), (8, 9), (9, eot)}  # each document predicts its own end
    assert (eot, 8) not in kept  # nothing predicts doc B's first token from doc A

    # The loss really leaves those positions out: the logits there can be anything.
    spec = LMSpec("tokens", eot, pad, 16, 9, 9)
    logits = torch.randn(1, 9, 16)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, tokens):
            return self.logits

    total, count = lm_forward(Fixed(logits), block, spec)
    changed = logits.clone()
    changed[0, 3, 8] += 100.0  # the EOT position now "predicts" doc B's first token (8)
    changed[0, 6:, :5] -= 50.0  # the last EOT and the padding
    total2, count2 = lm_forward(Fixed(changed), block, spec)
    assert int(count) == int(count2) == 5
    torch.testing.assert_close(total, total2)
    changed[0, 2, 3] += 5.0  # a kept position does count
    assert not torch.allclose(lm_forward(Fixed(changed), block, spec)[0], total)


def test_lr_schedule_warmup_then_cosine():
    from tasks.training.lm import lr_factor

    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, 100, 0, "constant", 0.1) == 1.0


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    from tasks.models import build_model

    model = build_model("gpt", {"vocab_size": 64, "seq_len": 16, **TINY_GPT})
    url = ckpt.write(str(tmp_path / "m"), {f"model.{k}": v for k, v in model.state_dict().items()}, {})
    tensors, meta = ckpt.load(url, formats=(ckpt.FORMAT_ID,))
    assert meta["tensor_aliases"] == {"model.head.weight": "model.embed.weight"}
    torch.testing.assert_close(tensors["model.head.weight"], model.head.weight.detach())


# --------------------------------------------------------------------------- built-in GPT


def test_gpt_trains_reports_and_records_what_generation_needs(text, tmp_path):
    result = run(TrainConfig(dataset=text, epochs=3, batch_size=8, model_args=TINY_GPT,
                             checkpoint_dir=str(tmp_path / "ck")))
    first, last = result.history[0], result.history[-1]
    assert last["val_loss"] < first["val_loss"] and last["val_ppl"] < 10
    for key in ("tokens_per_s", "mfu", "data_stall_share", "train_ppl"):
        assert last[key] is not None and last[key] > 0 or key == "data_stall_share"
    _, meta = ckpt.read_meta(result.checkpoint)
    assert meta["task"] == "causal-lm" and meta["eot_id"] == 0 and meta["pad_id"] == 1 and meta["seq_len"] == 32
    assert meta["tokenizer"]["file"] == "tokenizer.json"
    assert os.path.exists(f"{result.checkpoint}/tokenizer.json")
    assert len(result.samples) == 3 and all(isinstance(s["continuation"], str) for s in result.samples)
    assert not any(c.isdigit() for c in result.samples[0]["prompt"])  # decoded text, not ids

    from tasks.models.loading import load_model

    loaded = load_model(result.checkpoint)
    assert loaded.model.head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()  # still tied


def _final_tensors(url):
    tensors, _ = ckpt.load(url)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _resume_is_exact(cfg_kwargs, tmp_path):
    """Train straight through; then again, but stopped after a mid-epoch checkpoint and resumed:
    the final weights are the same."""
    straight = run(TrainConfig(checkpoint_dir=str(tmp_path / "straight"), **cfg_kwargs))
    interrupted = tmp_path / "interrupted"
    run(TrainConfig(checkpoint_dir=str(interrupted), **{**cfg_kwargs, "epochs": 1}))
    mid = [s for s in ckpt.steps(ckpt.url_to_fs(str(interrupted))[0], str(interrupted))]
    for step in mid[-2:]:  # keep only a mid-epoch checkpoint of epoch 1
        shutil.rmtree(interrupted / f"ckpt-{step:09d}")
    latest = ckpt.latest(str(interrupted))
    _, meta = ckpt.read_meta(latest)
    assert meta["batch"] > 0, "the test needs a mid-epoch checkpoint"
    resumed = run(TrainConfig(checkpoint_dir=str(interrupted), **cfg_kwargs))
    plan = prepare_training(TrainConfig(checkpoint_dir=str(interrupted), **cfg_kwargs))
    assert resumed.resumed_from == latest or plan is not None
    a, b = _final_tensors(straight.checkpoint), _final_tensors(resumed.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    return straight


def test_gpt_resumes_mid_epoch_exactly_with_accumulation_and_clipping(text, tmp_path):
    _resume_is_exact(dict(dataset=text, epochs=2, batch_size=8, model_args=TINY_GPT, checkpoint_every=7, keep_last=20,
                          grad_accum=2, grad_clip=0.5, warmup_steps=3), tmp_path)


def test_activation_checkpointing_gives_the_same_gradients(text):
    from tasks.models import build_model
    from tasks.training.lm import LMSpec, enable_activation_checkpointing, lm_forward

    tokens = torch.randint(0, 64, (2, 16))
    spec = LMSpec("tokens", 0, None, 64, 16, 16)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model("gpt", {"vocab_size": 64, "seq_len": 16, **TINY_GPT})
        if checkpointing:
            enable_activation_checkpointing(model)
        total, count = lm_forward(model, tokens, spec)
        (total / count).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- hf: models


def test_hf_model_gives_the_logits_of_transformers_own_forward(hf_folder):
    import transformers

    from tasks.models import build_model

    ours = build_model(f"hf:{hf_folder}").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, local_files_only=True,
                                                               use_safetensors=True).eval()
    tokens = torch.randint(0, 258, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits)


def test_hf_model_trains_checkpoints_and_resumes_exactly(hf_folder, text, tmp_path):
    straight = _resume_is_exact(dict(dataset=text, model=f"hf:{hf_folder}", epochs=2, batch_size=8, checkpoint_every=9,
                                     keep_last=20), tmp_path)
    assert straight.history[-1]["val_loss"] < straight.history[0]["train_loss"]
    _, meta = ckpt.read_meta(straight.checkpoint)
    assert meta["hf"]["source"] == hf_folder and meta["hf"]["model_type"] in ("gpt2", "llama")

    from tasks.models.loading import load_model

    loaded = load_model(straight.checkpoint)  # rebuilt from the recorded config, the folder not needed
    tensors = _final_tensors(straight.checkpoint)
    torch.testing.assert_close(loaded.model.state_dict()["model.lm_head.weight"], tensors["model.model.lm_head.weight"])


def _lora_checks(base_url, lora_result, lora_model_check):
    from tasks.models.loading import load_model
    from tasks.training.lora import merge_lora

    tuned = load_model(lora_result.checkpoint)
    tensors = _final_tensors(lora_result.checkpoint)
    adapters = [k for k in tensors if "lora_" in k]
    assert adapters
    base = lora_model_check()
    frozen = [k for k in tensors if k not in adapters]
    unmatched = [k for k in frozen if _base_key(k) not in base]
    assert len(unmatched) <= 1, unmatched  # GPT-2's lm_head is its (tied) embedding, not in the file
    changed = [k for k in tensors if k not in adapters
               and not torch.equal(tensors[k], base.get(_base_key(k), tensors[k]))]
    assert changed == [], f"LoRA changed frozen weights: {changed[:5]}"
    assert any(not torch.all(tensors[k] == 0) for k in adapters if "lora_b" in k.lower())
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        before = tuned.model(tokens)
        merge_lora(tuned.model)
        after = tuned.model(tokens)
    assert not any("lora" in k.lower() for k in tuned.model.state_dict())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    adapters_dir = ckpt.latest(f"{lora_result.checkpoint.rsplit('/', 1)[0]}/adapters")
    saved, _ = ckpt.load(adapters_dir)
    assert set(saved) and all("lora_" in k for k in saved)


def _base_key(key: str) -> str:
    """A LoRA checkpoint's name of a frozen weight, as the base model names it."""
    return key.replace(".base_model.model.", ".").replace(".base_layer.", ".").replace(".base.", ".")


def test_gpt_lora_from_a_checkpoint_changes_only_adapters(text, tmp_path):
    base = run(TrainConfig(dataset=text, epochs=1, batch_size=8, model_args=TINY_GPT, checkpoint_dir=str(tmp_path / "b")))
    tuned = run(TrainConfig(dataset=text, epochs=1, batch_size=8, model_args=TINY_GPT, init_from=base.checkpoint,
                            lora_rank=4, lora_targets=r"(qkv|attn\.proj|mlp\.fc|mlp\.proj)",
                            checkpoint_dir=str(tmp_path / "l")))
    _lora_checks(base.checkpoint, tuned, lambda: _final_tensors(base.checkpoint))


def test_hf_lora_uses_peft_and_changes_only_adapters(hf_folder, text, tmp_path):
    tuned = run(TrainConfig(dataset=text, init_from=f"hf:{hf_folder}", epochs=1, batch_size=8, lr=1e-2, lora_rank=4,
                            lora_targets=r"(q_proj|v_proj|c_attn|up_proj|down_proj|c_fc|mlp\.c_proj)",
                            checkpoint_dir=str(tmp_path / "l")))
    from safetensors.torch import load_file

    original = load_file(os.path.join(hf_folder, "model.safetensors"))

    def base():
        return {f"model.model.{k}": v for k, v in original.items()}

    _lora_checks(hf_folder, tuned, base)


def test_unigram_baseline_counts_the_positions_the_lm_loss_counts(tmp_path):
    """Kept train targets 1, end-of-text, 2 (none after end-of-text, none on padding): with
    add-one smoothing over 4 ids p = (1, 2, 2, 2) / 7; the val targets 1 and 2 score
    exp(-(log 2/7 + log 2/7) / 2)."""
    import math

    import numpy as np

    from storage.dataset import Dataset
    from tasks.training.baseline import unigram_perplexity
    from tasks.training.lm_data import lm_spec
    from tests.lm_data import write_token_dataset

    eot, pad = 3, 0
    train = np.array([[1, 1, eot, 2, 2, pad]])
    val = np.array([[2, 1, 2, pad, pad, pad]])
    dest = write_token_dataset(str(tmp_path / "ds"), {"train": train, "val": val},
                               {"vocab_size": 4, "eot_id": eot, "pad_id": pad}, None)
    spec = lm_spec(Dataset.open(dest), None, None)
    p = np.array([1, 2, 2, 2]) / 7
    assert unigram_perplexity(dest, spec) == pytest.approx(math.exp(-(math.log(p[1]) + math.log(p[2])) / 2))
    only_train = write_token_dataset(str(tmp_path / "t"), {"train": train},
                                     {"vocab_size": 4, "eot_id": eot, "pad_id": pad}, None)
    assert unigram_perplexity(only_train, spec) is None

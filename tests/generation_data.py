"""Tiny language-model checkpoints and prompt files for the offline generation tests: the
built-in GPT with random weights, saved as the LM contract says (safetensors + meta.json with
``task: causal-lm`` and ``eot_id``, the tokenizer.json beside them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from storage import checkpoint as ckpt
from tests.lm_data import documents, train_tokenizer

CONTEXT = 48


def lm_checkpoint(folder: Path, seed: int = 0) -> str:
    """A causal-LM checkpoint of a tiny built-in GPT (random weights) and its BPE tokenizer."""
    from tasks.models.gpt import build

    tok = train_tokenizer(documents(120, seed), vocab_size=120)
    torch.manual_seed(seed)
    args = {"vocab_size": tok.get_vocab_size(), "seq_len": CONTEXT, "d_model": 32, "n_heads": 4, "n_layers": 2}
    model = build(**args).eval()
    ckpt_dir = folder / "ckpt-000000001"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "tokenizer.json").write_text(tok.to_str())
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    ckpt.write(str(ckpt_dir), tensors, {"model": {"name": "gpt", "args": args}, "task": "causal-lm",
                                        "eot_id": tok.token_to_id("<|endoftext|>"), "seq_len": CONTEXT})
    return str(folder)


def classifier_checkpoint(folder: Path) -> str:
    from tasks.models import build_model

    args = {"in_features": 4, "num_classes": 2}
    model = build_model("mlp", args)
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    ckpt.write(str(folder / "ckpt-000000001"), tensors, {"model": {"name": "mlp", "args": args}, "task": "classify"})
    return str(folder)


def prompts(n: int, seed: int = 1) -> list[str]:
    """Short prompts of a few words each (the tokenizer's own vocabulary)."""
    return [" ".join(d.split()[: 2 + i % 5]) for i, d in enumerate(documents(n, seed))]


def jsonl_prompts(path: Path, texts: list[str], column: str = "prompt", ids: bool = True) -> str:
    path.write_text("".join(json.dumps({**({"id": f"p{i}"} if ids else {}), column: t}) + "\n"
                            for i, t in enumerate(texts)))
    return str(path)

"""Hugging Face causal language models from a folder: ``--model hf:URL``.

The folder (local, or any fsspec URL, copied first to a node-local cache) must hold
``config.json`` and ``*.safetensors`` weights; it is loaded with ``transformers``'
``AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)``,
so nothing is downloaded and no pickle is ever read (a folder with only a pickled
``pytorch_model.bin`` is refused). :class:`HFCausalLM` wraps it as our models are used:
``forward(tokens) -> logits``, ``generate_greedy``, and LoRA through ``peft``.

A checkpoint of an ``hf:`` model records the model's config (``meta["hf"]``), so it is
rebuilt with ``from_config`` and its own tensors: the source folder is not needed again.

LoRA on these models uses ``peft`` (0.21, with transformers 5): it knows every
architecture's layer types (GPT-2's ``Conv1D`` with its transposed weights, fused
projections), merges exactly, and is what users of these models already know. The
built-in models keep :mod:`tasks.training.lora`, which needs no transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import torch
from torch import nn

from storage.errors import ConfigError

PREFIX = "hf:"
CACHE_ENV = "SWARM_HF_CACHE"


def is_hf(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def _cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "swarm", "hf")


def local_folder(url: str, storage_options: dict | None = None) -> str:
    """A local folder holding the model at ``url``: the folder itself, or a cached copy of a
    remote one (copied once, atomically: a folder is renamed into place when complete)."""
    from storage.urls import is_local, url_to_fs

    if not url:
        raise ConfigError("--model hf:URL needs a folder after 'hf:' (config.json plus *.safetensors)")
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError, OSError):
        raise ConfigError(f"hf: model folder {url!r} does not exist or is not a folder") from None
    _check_files(url, names)
    if is_local(fs):
        return path
    wanted = [n for n in names if n.endswith((".json", ".safetensors", ".txt", ".model"))]
    key = hashlib.sha256(json.dumps([url, sorted((n, fs.info(f"{path}/{n}").get("size")) for n in wanted)])
                         .encode()).hexdigest()[:20]
    dest = os.path.join(_cache_root(), key)
    if os.path.isdir(dest):
        return dest
    tmp = f"{dest}.part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in wanted:
        fs.get_file(f"{path}/{name}", os.path.join(tmp, name))
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished its copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _check_files(url: str, names: list[str]) -> None:
    if "config.json" not in names:
        raise ConfigError(f"hf: model folder {url!r} has no config.json (it holds: {', '.join(sorted(names)) or 'nothing'})")
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickles:
            raise ConfigError(
                f"hf: model folder {url!r} holds only pickled weights ({', '.join(sorted(pickles))}), which are refused "
                "because loading them can run code; convert them to safetensors (model.save_pretrained(folder, "
                "safe_serialization=True)) in a trusted environment"
            )
        raise ConfigError(f"hf: model folder {url!r} has no *.safetensors weights")


class HFCausalLM(nn.Module):
    """A transformers causal LM as ``forward(tokens) -> logits``; ``self.model`` is the HF model
    (a peft model while LoRA adapters are on)."""

    def __init__(self, model, source: str):
        super().__init__()
        self.model = model
        self.source = source

    @property
    def config(self):
        return self.model.config

    @property
    def context(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens.long(), use_cache=False).logits

    @torch.no_grad()
    def generate_greedy(self, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation by full recompute (no cache), cut to the model's context."""
        limit = self.context or tokens.shape[1] + max_new_tokens
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -limit:])
            tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return tokens

    def gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records so the model can be rebuilt (and generation picks a runner)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"source": self.source, "model_type": base.config.model_type,
                "architecture": type(base).__name__, "config": base.config.to_dict()}

    # ---- LoRA through peft
    def adaptable_layers(self) -> list[str]:
        from transformers.pytorch_utils import Conv1D

        return [n for n, m in self.model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]

    def apply_lora(self, rank: int, alpha: float, targets: str) -> list[str]:
        from peft import LoraConfig, get_peft_model

        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"lora_targets {targets!r} is not a valid regex: {exc}") from None
        layers = self.adaptable_layers()
        chosen = [n for n in layers if pattern.search(n)]
        if not chosen:
            raise ConfigError(f"lora_targets {targets!r} matches no Linear layer; the model's layers: {', '.join(layers)}")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=chosen,
                            fan_in_fan_out=self.model.config.model_type == "gpt2")
        self.model = get_peft_model(self.model, config)
        return chosen

    def merge_lora(self) -> list[str]:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return []
        names = [n for n, m in self.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]
        self.model = self.model.merge_and_unload()
        for p in self.model.parameters():
            p.requires_grad_(True)
        return names


def build(source: str, config: dict[str, Any] | None = None, storage_options: dict | None = None) -> HFCausalLM:
    """The model of ``hf:source``: pretrained weights from the folder, or, given the ``config``
    recorded in a checkpoint, the architecture alone (its tensors come from the checkpoint)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if config is not None:
        cfg = transformers.AutoConfig.for_model(**config)
        return HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg), source)
    folder = local_folder(source, storage_options)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"hf: model folder {source!r} cannot be loaded as a causal LM: {' '.join(str(exc).split())[:400]}") from None
    return HFCausalLM(model, source)

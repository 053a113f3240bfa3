"""Causal-LM training pieces: the masked next-token loss, the learning-rate schedule, MFU.

The loss follows the data contract (see README, "Language models"): in a packed block
every position is input and the target of position ``i`` is position ``i + 1``; no loss
where the *input* is the end-of-text id (its target is the next document's first token)
or where the input or the target is padding. The loss of a step is the sum over the
global batch's kept positions divided by their count (one small all-reduce of the count
when there are several ranks), so two ranks of batch b take exactly the step one rank of
batch 2b takes, however the kept positions fall between ranks.

MFU (model FLOPs utilisation) counts the FLOPs the model needs per token, as PaLM and
nanoGPT do: ``6 N + 12 L d T`` (N non-embedding parameters, L layers, width d, context
T; activation recomputation is not counted), against the device's dense bf16 peak:
a table of datacenter GPUs by name, and on CPU ``threads x 2.5 GHz x 32 FLOP/cycle``
(two AVX2 FMA units on 8 fp32 lanes), i.e. 80 GFLOP/s per thread — a nominal figure for
this machine's cores, so CPU MFU is indicative only. ``$SWARM_PEAK_FLOPS`` overrides both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CPU_FLOPS_PER_THREAD = 2.5e9 * 32
#: Dense bf16 tensor-core peak (FLOP/s) by a substring of ``torch.cuda.get_device_name()``; first match wins.
GPU_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("L4", 121e12),
                 ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12))


@dataclass(frozen=True)
class LMSpec:
    """What the causal-LM step needs to know about the data (from the manifest metadata)."""

    column: str
    eot_id: int | None
    pad_id: int | None
    vocab_size: int
    data_seq_len: int   # tokens per stored block
    seq_len: int        # tokens per training block (a stored block is cut into data_seq_len // seq_len)
    tokenizer: dict[str, Any] | None = None

    def checkpoint_meta(self) -> dict[str, Any]:
        """The contract's fields in a checkpoint's meta.json, for generation."""
        return {"task": "causal-lm", "tokenizer": self.tokenizer, "eot_id": self.eot_id, "pad_id": self.pad_id,
                "seq_len": self.seq_len, "vocab_size": self.vocab_size, "token_column": self.column}


def blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Stored blocks (B, S) as training blocks (B * S // seq_len, seq_len); a tail shorter than
    ``seq_len`` is left out."""
    b, s = tokens.shape
    if s == seq_len:
        return tokens
    per = s // seq_len
    return tokens[:, : per * seq_len].reshape(b * per, seq_len)


def targets_and_mask(tokens: torch.Tensor, eot_id: int | None, pad_id: int | None):
    """``(inputs, targets, keep)`` of a batch of blocks: position i predicts i + 1, kept unless
    the input is end-of-text or either side is padding."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)
    if eot_id is not None:
        keep &= inputs != eot_id
    if pad_id is not None:
        keep &= (inputs != pad_id) & (targets != pad_id)
    return inputs, targets, keep


IGNORE = -100  # cross_entropy's ignore_index: a position without a loss term


def masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor):
    """Sum of the kept positions' cross-entropy (fp32) and how many were kept, as tensors."""
    targets = targets.long().masked_fill(~keep, IGNORE)
    return _loss_sum(logits, targets)


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor):
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total, (targets != IGNORE).sum()


def lm_forward(net, tokens: torch.Tensor, spec: LMSpec):
    """Logits for every position of the training blocks and the loss terms: ``(sum, count)``.

    The whole block goes through the model (so positions see exactly the context they
    would in generation). Targets are laid out like the logits, the last position's
    ignored, so the logits are never sliced or copied.
    """
    tokens = blocks(tokens, spec.seq_len).long()
    _, targets, keep = targets_and_mask(tokens, spec.eot_id, spec.pad_id)
    targets = torch.cat([targets.masked_fill(~keep, IGNORE), torch.full_like(targets[:, :1], IGNORE)], dim=1)
    return _loss_sum(net(tokens), targets)


def step_loss(loss_sum: torch.Tensor, count: torch.Tensor, world_size: int) -> torch.Tensor:
    """The loss to back-propagate: mean over the global batch's kept positions. DDP averages
    gradients over ranks, so each rank's sum is divided by the global count / world size."""
    total = count.detach().to(torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    return loss_sum * (world_size / total.clamp(min=1).to(loss_sum.dtype))


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


# --------------------------------------------------------------------------- learning rate


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of ``total``:
    linear warmup over ``warmup`` steps, then constant or a cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule != "cosine" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- FLOPs and MFU


def _shape(model) -> tuple[int | None, int | None]:
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "n_layers", None) or getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    width = getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return layers, width


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L d T`` (forward and backward, attention included)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in embeddings:
            continue
        seen.add(id(p))
        n += p.numel()
    layers, width = _shape(model)
    return 6.0 * n + (12.0 * layers * width * seq_len if layers and width else 0.0)


def peak_flops(device, threads: int = 1) -> tuple[float, str]:
    """The device's peak FLOP/s and where the figure comes from."""
    override = os.environ.get("SWARM_PEAK_FLOPS")
    if override:
        return float(override), "$SWARM_PEAK_FLOPS"
    if getattr(device, "type", "cpu") == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16:
            if key in name:
                return value, f"{name} dense bf16"
        return 312e12, f"{name} (unknown: A100 bf16 assumed)"
    return threads * CPU_FLOPS_PER_THREAD, f"CPU {threads} thread(s) x 80 GFLOP/s nominal"


def mfu(model, seq_len: int, tokens_per_s_per_device: float, device, threads: int = 1) -> float:
    peak, _ = peak_flops(device, threads)
    return flops_per_token(model, seq_len) * tokens_per_s_per_device / peak


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward: the built-in GPT's blocks, or transformers' own switch."""
    switch = getattr(model, "gradient_checkpointing", None)
    if not callable(switch):
        from storage.errors import ConfigError

        raise ConfigError(f"activation checkpointing is supported for the gpt and hf: models, not {type(model).__name__}")
    switch()

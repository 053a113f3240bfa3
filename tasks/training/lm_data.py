"""Token datasets for causal-LM training: which task, the checks, evaluation and samples.

A staged text dataset (see the data contract in README, "Language models") says in its
manifest metadata ``kind: "text"``, ``vocab_size``, ``eot_id``, ``pad_id``, ``seq_len`` and
its ``tokenizer`` (a copy, ``tokenizer.json``, sits in the dataset folder). Any dataset
with one integer token column and no label (``synthetic-tokens`` with ``--task causal-lm``
too) can be trained on; the checks here run before any rank starts and name the bad
value: a vocabulary larger than the model's embedding, blocks longer than its context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from storage.dataset import Dataset
from storage.errors import ConfigError
from storage.urls import url_to_fs
from tasks.training.lm import LMSpec, lm_forward, perplexity

SAMPLE_PROMPTS = 3
PROMPT_TOKENS = 16
NEW_TOKENS = 24


def resolve_task(ds: Dataset, asked: str, label_column: str | None) -> str:
    """``causal-lm`` for text datasets and token datasets without labels, else ``classify``."""
    if asked != "auto":
        return asked
    meta = ds.manifest.metadata
    if meta.get("kind") == "text":
        return "causal-lm"
    names = ds.schema.names
    label = label_column or meta.get("label") or "label"
    if label not in names and len(names) == 1 and _is_token_list(ds.schema.field(names[0]).type):
        return "causal-lm"
    return "classify"


def _is_token_list(ftype: pa.DataType) -> bool:
    return (pa.types.is_fixed_size_list(ftype) or pa.types.is_list(ftype)) and pa.types.is_integer(ftype.value_type)


def lm_spec(ds: Dataset, column: str | None, seq_len: int | None) -> LMSpec:
    """The token column and the contract's metadata, checked (packed fixed-size blocks only)."""
    meta = ds.manifest.metadata
    names = ds.schema.names
    column = column or ("tokens" if "tokens" in names else meta.get("feature"))
    if column not in names:
        raise ConfigError(f"dataset {ds.url!r} has no token column {column!r} (columns: {', '.join(names)}); "
                          "pass --feature-column")
    ftype = ds.schema.field(column).type
    if not (pa.types.is_fixed_size_list(ftype) and pa.types.is_integer(ftype.value_type)):
        hint = " (unpacked: stage it again packed, with --seq-len)" if _is_token_list(ftype) else ""
        raise ConfigError(f"causal-LM training needs packed blocks of token ids; column {column!r} of {ds.url!r} "
                          f"is {ftype}{hint}")
    data_seq_len = ftype.list_size
    if "vocab_size" not in meta:
        raise ConfigError(f"dataset {ds.url!r} does not record its vocab_size in the manifest metadata")
    want = data_seq_len if seq_len is None else seq_len
    if want < 2 or want > data_seq_len:
        raise ConfigError(f"--seq-len {want} is not possible with {ds.url!r}: its blocks hold {data_seq_len} tokens; "
                          f"give 2 to {data_seq_len}")
    eot, pad = meta.get("eot_id"), meta.get("pad_id")
    return LMSpec(column, None if eot is None else int(eot), None if pad is None else int(pad),
                  int(meta["vocab_size"]), data_seq_len, want, meta.get("tokenizer"))


def model_limits(model) -> tuple[int | None, int | None]:
    """``(vocabulary, context)`` of a causal LM (None where it does not say)."""
    import torch

    vocab = getattr(model, "vocab_size", None)
    cfg = getattr(model, "config", None)
    if vocab is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
        vocab = emb.num_embeddings if emb is not None else getattr(cfg, "vocab_size", None)
    context = getattr(model, "context", None) or getattr(cfg, "seq_len", None)
    return vocab, context


def check_model(model, name: str, spec: LMSpec, ds: Dataset) -> None:
    """The dataset's ids fit the model's embedding and its blocks fit the model's context."""
    vocab, context = model_limits(model)
    if vocab is not None and spec.vocab_size > vocab:
        raise ConfigError(f"dataset {ds.url!r} has a vocabulary of {spec.vocab_size} tokens, larger than model "
                          f"{name!r}'s embedding ({vocab}); use a model with vocab_size >= {spec.vocab_size}")
    if context is not None and spec.seq_len > context:
        raise ConfigError(f"--seq-len {spec.seq_len} is over model {name!r}'s context ({context} positions); "
                          f"give --seq-len {context} or less, or a model with a longer context")
    table = ds.read_shard(ds.shards("train")[0]).slice(0, 2)
    tokens = token_array(table, spec.column)
    if tokens.size and int(tokens.max()) >= (vocab or spec.vocab_size):
        raise ConfigError(f"dataset {ds.url!r} holds token id {int(tokens.max())}, outside model {name!r}'s "
                          f"vocabulary of {vocab or spec.vocab_size}")


def token_array(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.int64)


def tokenizer_bytes(dataset: str, spec: LMSpec, storage_options: dict | None = None) -> bytes | None:
    """The dataset's copy of its tokenizer.json, if it has one."""
    name = (spec.tokenizer or {}).get("file") or "tokenizer.json"
    fs, root = url_to_fs(dataset, storage_options)
    try:
        return fs.cat_file(f"{root.rstrip('/')}/{name}")
    except (FileNotFoundError, OSError):
        return None


def evaluate(model, val, spec: LMSpec, world_size: int, device, autocast) -> float | None:
    """Mean next-token loss over a split, every rank its share, summed across ranks."""
    import torch
    import torch.distributed as dist

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in val:
            with autocast():
                loss_sum, count = lm_forward(model, batch[spec.column].to(device), spec)
            totals[0] += loss_sum.double()
            totals[1] += count
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    total = totals.cpu().tolist()
    return total[0] / total[1] if total[1] else None


def sample_continuations(model, dataset: str, spec: LMSpec, tokenizer: bytes | None, device,
                         storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Greedy continuations of the first validation blocks' openings (train if no val split)."""
    import torch

    ds = Dataset.open(dataset, storage_options)
    split = "val" if "val" in ds.manifest.splits else "train"
    table = ds.read_shard(ds.shards(split)[0]).slice(0, SAMPLE_PROMPTS)
    prompts = token_array(table, spec.column)[:, : min(PROMPT_TOKENS, spec.seq_len // 2)]
    decode = _decoder(tokenizer)
    rows = []
    model.eval()
    for prompt in prompts:
        out = model.generate_greedy(torch.from_numpy(prompt).unsqueeze(0).to(device), NEW_TOKENS)[0, len(prompt):]
        new = out.tolist()
        if spec.eot_id is not None and spec.eot_id in new:
            new = new[: new.index(spec.eot_id)]
        rows.append({"prompt": decode(prompt.tolist()), "continuation": decode(new)})
    model.train()
    return rows


def _decoder(tokenizer: bytes | None):
    if tokenizer is None:
        return lambda ids: " ".join(map(str, ids))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.decode())
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def history_row(epoch: int, loss_sum: float, count: float, val_loss: float | None, tokens: int, elapsed: float,
                stall_s: float, model_flops: float, peak: float, world_size: int, rows: int, lr: float,
                hit_rate) -> dict[str, Any]:
    """One epoch of causal-LM training as the per-epoch table shows it."""
    train_loss = loss_sum / count if count else float("nan")
    tokens_per_s = tokens / max(elapsed, 1e-9)
    return {
        "epoch": epoch,
        "train_loss": round(train_loss, 5),
        "train_ppl": round(perplexity(train_loss), 3),
        "val_loss": None if val_loss is None else round(val_loss, 5),
        "val_ppl": None if val_loss is None else round(perplexity(val_loss), 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(model_flops * tokens_per_s / (peak * world_size), 6),
        "samples_per_s": round(rows / max(elapsed, 1e-9), 1),
        "data_stall_share": round(stall_s / max(elapsed, 1e-9), 4),
        "cache_hit_rate": hit_rate,
        "lr": lr,
        "epoch_s": round(elapsed, 3),
        "train_acc": None,
        "val_acc": None,
    }

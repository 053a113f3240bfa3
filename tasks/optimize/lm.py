"""Optimizing a language model: its eval data (token blocks), checks, and what the artifact
records for generation (the checkpoint's task, tokenizer, ids and context, the hf: config
after pruning, and a copy of the tokenizer.json)."""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.dataset import Dataset
from storage.urls import url_to_fs
from tasks.training.lm import LMSpec
from tasks.training.lm_data import check_model, lm_spec, token_array

LM_KEYS = ("task", "tokenizer", "eot_id", "pad_id", "seq_len", "vocab_size", "token_column")


def prepare_lm(cfg, loaded, ds: Dataset, split: str | None) -> tuple[LMSpec, int]:
    """The eval dataset's token blocks, checked against the model; ``(spec, blocks)``."""
    meta = loaded.meta
    column = cfg.feature_column or meta.get("token_column")
    spec = lm_spec(ds, column, None)
    context = meta.get("seq_len")
    if context and spec.seq_len > context:  # score in blocks of the length the model was trained on
        spec = lm_spec(ds, column, int(context))
    if spec.eot_id is None and meta.get("eot_id") is not None:
        spec = LMSpec(spec.column, int(meta["eot_id"]), spec.pad_id, spec.vocab_size, spec.data_seq_len, spec.seq_len,
                      spec.tokenizer)
    check_model(loaded.model, loaded.name, spec, ds)
    return spec, sum(e.rows for e in ds.shards(split))


def eval_blocks(cfg, plan) -> np.ndarray:
    """The eval split's blocks, cut to the training block length."""
    table = Dataset.open(cfg.eval_dataset, cfg.storage_options).read_table(plan.eval_split)
    blocks = token_array(table, plan.lm.column)
    per = blocks.shape[1] // plan.lm.seq_len
    return np.ascontiguousarray(blocks[:, : per * plan.lm.seq_len].reshape(-1, plan.lm.seq_len))


def lm_record(cfg, loaded, model) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Metadata and files the optimized model carries over from its checkpoint."""
    from tasks.optimize.precision import unwrap

    meta = {k: loaded.meta[k] for k in LM_KEYS if k in loaded.meta}
    inner = unwrap(model)
    if hasattr(inner, "describe"):
        meta["hf"] = inner.describe()
    files = {}
    fs, folder = url_to_fs(loaded.url, cfg.storage_options)
    try:
        files["tokenizer.json"] = fs.cat_file(f"{folder.rstrip('/')}/tokenizer.json")
    except (FileNotFoundError, OSError):
        pass
    return meta, files

"""A unigram model's validation perplexity: the floor a causal LM must clearly beat.

A language model that learned nothing but token frequencies scores the unigram model's
perplexity; one that learned context scores well below it. The unigram model here is fitted
on the train split's target tokens (add-one smoothing over the whole vocabulary, so no
token has probability zero) and scored on exactly the validation positions the LM's own
validation loss counts (the same blocks and the same mask: no target after end-of-text,
none on padding; :func:`tasks.training.lm.targets_and_mask`). Counting is ``np.bincount``
per shard: one pass over at most ``max_tokens`` tokens per split, on the driver.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from storage.dataset import Dataset
from tasks.training.lm import LMSpec, blocks, targets_and_mask
from tasks.training.lm_data import token_array

MAX_TOKENS = 50_000_000  # per split: enough for a stable estimate, bounded time on a large corpus


def _target_counts(ds: Dataset, split: str, spec: LMSpec, max_tokens: int) -> np.ndarray:
    counts = np.zeros(spec.vocab_size, dtype=np.int64)
    seen = 0
    for table in ds.iter_tables(split):
        tokens = blocks(torch.from_numpy(token_array(table, spec.column)), spec.seq_len)
        _, targets, keep = targets_and_mask(tokens, spec.eot_id, spec.pad_id)
        kept = targets[keep].numpy()
        counts += np.bincount(kept, minlength=spec.vocab_size)[: spec.vocab_size]
        seen += tokens.numel()
        if seen >= max_tokens:
            break
    return counts


def unigram_perplexity(dataset: str, spec: LMSpec, storage_options: dict | None = None,
                       max_tokens: int = MAX_TOKENS) -> float | None:
    """Perplexity on the ``val`` split of a unigram model fitted on ``train``; ``None`` without
    a validation split (or with no kept validation position)."""
    ds = Dataset.open(dataset, storage_options)
    if "val" not in ds.manifest.splits or "train" not in ds.manifest.splits:
        return None
    train = _target_counts(ds, "train", spec, max_tokens)
    val = _target_counts(ds, "val", spec, max_tokens)
    if not val.sum():
        return None
    log_p = np.log(train + 1.0) - math.log(train.sum() + spec.vocab_size)
    return float(math.exp(-(val * log_p).sum() / val.sum()))

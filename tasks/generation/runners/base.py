"""What a model runner is: it runs the packed batch it is given, over the paged cache.

A runner knows its model's shape (layers, key/value heads, head size, context, vocabulary)
so the engine can size the cache, and ``forward`` returns next-token logits for the last
new token of each scheduled sequence. It decides nothing: the scheduler chooses what runs.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.generation.kv_cache import BatchLayout, PagedKVCache


class ModelRunner:
    model: Any
    num_layers: int
    kv_heads: int
    head_dim: int
    context: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    tokenizer: Any = None   # a tokenizers.Tokenizer when the model came with one

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.num_layers, num_blocks, block_size, self.kv_heads, self.head_dim,
                            dtype=self.dtype, device=self.device)

    def bytes_per_token(self) -> int:
        return PagedKVCache.bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: PagedKVCache) -> torch.Tensor:
        """tokens (T,) packed new tokens -> logits (B, vocab) at each sequence's last new token."""
        raise NotImplementedError

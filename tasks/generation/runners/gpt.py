"""Cached runner for the built-in GPT (``tasks/models/gpt.py``), reusing its modules as they
are: ``embed_tokens`` with explicit positions, each block's ``split_heads``/``merge_heads``
around the paged attention, its MLP and norms, the tied head."""

from __future__ import annotations

import torch

from tasks.generation.kv_cache import BatchLayout, PagedKVCache, paged_attention
from tasks.generation.runners.base import ModelRunner


class GPTRunner(ModelRunner):
    def __init__(self, model, eos_token_ids: tuple[int, ...] = (), tokenizer=None):
        cfg = model.config
        self.model = model.eval()
        self.num_layers = cfg.n_layers
        self.kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.context = cfg.seq_len
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: PagedKVCache) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(tokens[None], layout.positions)          # (1, T, C)
        for i, block in enumerate(m.blocks):
            q, k, v = block.attn.split_heads(block.ln1(x))          # (1, H, T, D)
            y = paged_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cache, i, layout)
            x = x + block.attn.merge_heads(y.transpose(0, 1)[None])
            x = x + block.mlp(block.ln2(x))
        return m.head(m.ln_f(x[0, layout.last]))

"""Cached runners for Hugging Face causal LMs of the Llama family (Llama, Mistral, Qwen2:
RMSNorm, rotary positions, grouped-query attention) and the GPT-2 family (learned
positions, fused ``c_attn``). They call the loaded model's own modules — embeddings, norms,
projections, MLPs, its rotary embedding and ``apply_rotary_pos_emb`` — and replace only the
attention over the cache with :func:`paged_attention`, so any checkpoint of these
architectures runs with its weights unchanged."""

from __future__ import annotations

import torch

from storage.errors import ConfigError
from tasks.generation.kv_cache import BatchLayout, PagedKVCache, paged_attention
from tasks.generation.runners.base import ModelRunner

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GPT2_FAMILY = ("gpt2",)


def _eos_ids(config) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


class LlamaRunner(ModelRunner):
    def __init__(self, model, tokenizer=None):
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
                and cfg.sliding_window < cfg.max_position_embeddings:
            raise ConfigError(f"{cfg.model_type} model with a sliding window of {cfg.sliding_window} tokens: "
                              f"the generation engine supports full attention only")
        self.model = model.eval()
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.context = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = _eos_ids(cfg)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: PagedKVCache) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        x = inner.embed_tokens(tokens[None])                        # (1, T, C)
        cos, sin = inner.rotary_emb(x, layout.positions[None])       # (1, T, D)
        t = tokens.shape[0]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, t, -1, self.head_dim)
            k = attn.k_proj(h).view(1, t, -1, self.head_dim)
            v = attn.v_proj(h).view(1, t, -1, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            y = paged_attention(q[0], k[0], v[0], cache, i, layout, scale=attn.scaling)
            x = x + attn.o_proj(y.reshape(1, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(inner.norm(x[0, layout.last]))


class GPT2Runner(ModelRunner):
    def __init__(self, model, tokenizer=None):
        cfg = model.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "add_cross_attention", False):
            raise ConfigError("GPT-2 models with scale_attn_by_inverse_layer_idx or cross-attention are not supported "
                              "by the generation engine")
        self.model = model.eval()
        self.num_layers = cfg.n_layer
        self.kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.context = cfg.n_positions
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = _eos_ids(cfg)
        self.tokenizer = tokenizer
        self.scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: PagedKVCache) -> torch.Tensor:
        tr = self.model.transformer
        x = tr.wte(tokens[None]) + tr.wpe(layout.positions[None])
        t = tokens.shape[0]
        for i, block in enumerate(tr.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.kv_heads * self.head_dim, dim=2)
            shape = (t, self.kv_heads, self.head_dim)
            y = paged_attention(q[0].view(shape), k[0].view(shape), v[0].view(shape), cache, i, layout,
                                scale=self.scale)
            x = x + block.attn.c_proj(y.reshape(1, t, -1))
            x = x + block.mlp(block.ln_2(x))
        return self.model.lm_head(tr.ln_f(x[0, layout.last]))


def runner_for_hf(model, tokenizer=None) -> ModelRunner:
    model_type = getattr(model.config, "model_type", "")
    if model_type in LLAMA_FAMILY:
        return LlamaRunner(model, tokenizer)
    if model_type in GPT2_FAMILY:
        return GPT2Runner(model, tokenizer)
    raise ConfigError(
        f"no generation runner for Hugging Face model_type {model_type!r}; supported: "
        f"{', '.join(LLAMA_FAMILY + GPT2_FAMILY)}"
    )

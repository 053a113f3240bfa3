"""The paged KV cache: one pair of tensors allocated once, and attention over it.

The cache holds ``num_blocks * block_size`` slots per layer for keys and values
(``(layers, kv_heads, slots, head_dim)``: head-major, so a gather of a sequence's blocks is
already in the ``(batch, heads, length, head_dim)`` shape attention reads, each head's
keys contiguous, with no transpose copy); a sequence owns the blocks the pool handed it, in
order (its block table), so position ``p`` of a sequence lives in slot
``table[p // block_size] * block_size + p % block_size``. Nothing is allocated per request.

Each engine step runs one packed batch: every scheduled sequence contributes a chunk of new
tokens (a prefill chunk, or the one token of a decode step). :class:`BatchLayout` turns the
block tables into the index tensors a step needs, once per step for all layers;
:func:`paged_attention` writes the chunk's keys/values into their slots, gathers each
sequence's blocks back as a padded batch, and runs ``scaled_dot_product_attention`` with a
causal mask offset by what the sequence already has cached — once for the prefilling
sequences and once per run of decoding sequences of similar length
(:class:`AttentionPart`), so that little of the work is padding. We wrote this by hand (with
SDPA doing the arithmetic) because transformers' paged cache is tied to its own
continuous-batching manager, which was far too slow on CPU (see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, kv_heads, num_blocks * block_size, head_dim)
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


#: Decoding sequences per attention call: sorted by length and cut into runs of this many,
#: each padded only to its own longest (one call padded every row to the step's longest).
DECODE_ROWS_PER_CALL = 32


@dataclass
class AttentionPart:
    """Sequences of a step whose attention runs as one padded SDPA call: the prefilling ones
    (queries padded to the longest chunk), or a run of decoding ones of similar length (one
    query each), so a step mixing a long prefill chunk with many decodes does not pad every
    decode to the chunk's length."""

    tokens: torch.Tensor    # (T_p,) packed indices of the part's new tokens
    kv_blocks: torch.Tensor  # (B_p * L_p / block_size,) each row's blocks, padded with block 0 (masked)
    q_flat: torch.Tensor    # (T_p,) where each new token sits in the (B_p * Q_p) padded queries
    mask: torch.Tensor      # (B_p, 1, Q_p, L_p) True where a query may attend a key
    rows: int
    length: int             # L_p: the longest row's length, rounded up to whole blocks
    q_len: int              # Q_p

    @classmethod
    def build(cls, rows: list[int], tables, starts, counts, firsts, block_size: int, device) -> "AttentionPart":
        ix = torch.tensor(rows, dtype=torch.long)
        tables, starts, counts, firsts = tables[ix], starts[ix], counts[ix], firsts[ix]
        totals = starts + counts
        q_len, blocks = int(counts.max()), -(-int(totals.max()) // block_size)
        length = blocks * block_size
        key_pos = torch.arange(length)
        kv_blocks = tables[:, :blocks].masked_fill(torch.arange(blocks) * block_size >= totals[:, None], 0)
        local = torch.repeat_interleave(torch.arange(len(rows)), counts)
        ends = counts.cumsum(0)
        offsets = torch.arange(int(ends[-1])) - (ends - counts)[local]
        q_pos = starts[:, None] + torch.arange(q_len)                                      # (B, Q)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < totals[:, None, None])
        return cls(tokens=(firsts[local] + offsets).to(device), kv_blocks=kv_blocks.flatten().to(device),
                   q_flat=(local * q_len + offsets).to(device), mask=mask[:, None].to(device),
                   rows=len(rows), length=length, q_len=q_len)


@dataclass
class BatchLayout:
    """Index tensors for one step. ``T`` packed new tokens over ``B`` sequences."""

    positions: torch.Tensor     # (T,) position of each new token in its sequence
    slots: torch.Tensor         # (T,) cache slot each new token's key/value is written to
    last: torch.Tensor          # (B,) packed index of each sequence's last new token
    parts: list[AttentionPart]  # the step's attention calls

    @classmethod
    def build(cls, chunks: list[tuple[list[int], int, int]], block_size: int, device="cpu") -> "BatchLayout":
        """``chunks``: per sequence (block table, tokens already cached, new tokens)."""
        width = max(len(table) for table, _, _ in chunks)
        tables = torch.tensor([table + [0] * (width - len(table)) for table, _, _ in chunks], dtype=torch.long)
        starts = torch.tensor([start for _, start, _ in chunks], dtype=torch.long)
        counts = torch.tensor([n for _, _, n in chunks], dtype=torch.long)
        ends = counts.cumsum(0)
        firsts = ends - counts
        seq_ids = torch.repeat_interleave(torch.arange(len(chunks)), counts)
        positions = starts[seq_ids] + torch.arange(int(ends[-1])) - firsts[seq_ids]
        slots = tables[seq_ids, positions // block_size] * block_size + positions % block_size
        prefill = [i for i, (_, _, n) in enumerate(chunks) if n > 1]
        decode = sorted((i for i, (_, _, n) in enumerate(chunks) if n == 1), key=lambda i: chunks[i][1])
        groups = ([prefill] if prefill else []) + [decode[j:j + DECODE_ROWS_PER_CALL]
                                                   for j in range(0, len(decode), DECODE_ROWS_PER_CALL)]
        return cls(
            positions=positions.to(device),
            slots=slots.to(device),
            last=(ends - 1).to(device),
            parts=[AttentionPart.build(g, tables, starts, counts, firsts, block_size, device) for g in groups],
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layer: int,
                    layout: BatchLayout, scale: float | None = None) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) for the step's new tokens -> attention output (T, Hq, D).

    Writes k/v to the cache first, so a chunk attends to itself causally and to everything
    its sequence cached before. Grouped-query attention: each key/value head serves
    ``Hq // Hkv`` consecutive query heads (SDPA's ``enable_gqa``, as transformers' ``repeat_kv``)."""
    cache.k[layer].index_copy_(1, layout.slots, k.transpose(0, 1))
    cache.v[layer].index_copy_(1, layout.slots, v.transpose(0, 1))
    hq, hkv, d = q.shape[1], k.shape[1], k.shape[2]
    k_blocks = cache.k[layer].view(hkv, -1, cache.block_size, d)
    v_blocks = cache.v[layer].view(hkv, -1, cache.block_size, d)
    out = q.new_empty(q.shape)
    for part in layout.parts:
        b, length, q_len = part.rows, part.length, part.q_len
        # whole blocks gathered (a row of block_size slots per index, far cheaper than slot by slot)
        keys = k_blocks.index_select(1, part.kv_blocks).view(hkv, b, length, d).transpose(0, 1)  # (B, Hkv, L, D)
        values = v_blocks.index_select(1, part.kv_blocks).view(hkv, b, length, d).transpose(0, 1)
        mine = q.index_select(0, part.tokens)
        if q_len == 1:
            # one query per row: a key/value head's Hq // Hkv query heads are its queries, so
            # SDPA runs without expanding keys/values for grouped-query attention
            y = F.scaled_dot_product_attention(mine.view(b, hkv, hq // hkv, d), keys, values,
                                               attn_mask=part.mask, scale=scale)
            out.index_copy_(0, part.tokens, y.reshape(b, hq, d))
            continue
        mine = mine.new_zeros((b * q_len, hq, d)).index_copy_(0, part.q_flat, mine)
        queries = mine.view(b, q_len, hq, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=part.mask, scale=scale,
                                           enable_gqa=hq != hkv)
        out.index_copy_(0, part.tokens, y.transpose(1, 2).reshape(b * q_len, hq, d).index_select(0, part.q_flat))
    return out

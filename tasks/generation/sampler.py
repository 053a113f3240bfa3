"""Per-request sampling: greedy, temperature, top-k, top-p, each request with its own
``torch.Generator`` so its samples depend only on its own logits and seed, never on which
other requests share the batch."""

from __future__ import annotations

import torch

from tasks.generation.params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One next token from a (vocab,) row of logits."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """Next tokens for a (B, vocab) batch; greedy rows in one argmax."""
    greedy = logits.argmax(-1).tolist()
    return [greedy[i] if p.greedy else sample_row(logits[i], p, generators[i]) for i, p in enumerate(params)]

"""What a request asks for: its prompt and sampling parameters, validated at the edge.

Every bad value raises :class:`~storage.errors.ConfigError` naming the parameter, the value
and what is allowed, so the CLI can exit 2 and the server can answer 400 with the message.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

from storage.errors import ConfigError, SwarmError


class QueueFull(SwarmError):
    """The engine's waiting queue is full: try again later (the server answers 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token. ``temperature == 0`` is greedy (top-k/top-p then unused);
    ``top_k == 0`` and ``top_p == 1`` switch those filters off. ``seed`` makes the request's
    samples reproducible whatever else runs in the batch (each request has its own generator)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check_int("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        _check_int("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, "an integer >= 0 or None")
            if self.seed < 0:
                raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_ids = itertools.count()


@dataclass
class Request:
    """A prompt (token ids) and how to continue it. ``request_id`` is unique per process
    unless given."""

    prompt: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"
        if isinstance(self.prompt, str):
            raise ConfigError("prompt must be token ids; encode text with the model's tokenizer first")
        self.prompt = [int(t) for t in self.prompt]


def validate(request: Request, context: int, vocab_size: int, max_new_tokens_limit: int, pool_tokens: int) -> None:
    """Check a request against the model and the engine: raises ConfigError."""
    n = len(request.prompt)
    if n == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    bad = [t for t in request.prompt if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
    if n >= context:
        raise ConfigError(
            f"the prompt has {n} tokens; the model's context is {context} tokens, so a prompt may have at most "
            f"{context - 1}"
        )
    want = request.params.max_new_tokens
    if want > max_new_tokens_limit:
        raise ConfigError(f"max_new_tokens is {want}; this engine allows at most {max_new_tokens_limit}")
    if n + want > context:
        raise ConfigError(
            f"the prompt ({n} tokens) plus max_new_tokens ({want}) is {n + want} tokens, over the model's context "
            f"of {context}: ask for at most {context - n} new tokens"
        )
    if n + want > pool_tokens:
        raise ConfigError(
            f"the prompt ({n} tokens) plus max_new_tokens ({want}) needs {n + want} cache slots; the engine's KV pool "
            f"holds {pool_tokens}: lower max_new_tokens or start the engine with a larger pool"
        )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(name: str, v, allowed: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{name} must be {allowed}, got {v!r}")

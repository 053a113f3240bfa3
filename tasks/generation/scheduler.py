"""Iteration-level scheduling: decides, at every step, which sequences run and how many of
their tokens (vLLM v1's ``scheduler.py`` in miniature).

Every sequence is the same thing at every step: tokens whose keys/values are cached, and
tokens still to compute (the prompt at first, then the one token sampled last step). A step
has a token budget: running sequences go first — the decoding ones (one token each), then
those still prefilling (what is left of the budget, so a long prompt is prefilled in chunks
across steps and never stalls the decoders) — then waiting sequences
are admitted while the batch has room and the pool has the blocks for their whole prompt —
admission is a question asked of the pool. A running sequence that needs a new block when
none is free preempts the most recently admitted one: its blocks go back to the pool and it
returns to the head of the queue, to be recomputed from its tokens when blocks free up (as
vLLM does), so the pool is never over its budget and nothing runs out of memory.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.generation.block_pool import BlockPool
from tasks.generation.params import Request


@dataclass(eq=False)   # identity, not field-by-field: sequences are found in lists by `in`
class Sequence:
    request: Request
    generator: torch.Generator | None
    handle: Any = None
    tokens: list[int] = field(default_factory=list)
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    preemptions: int = 0

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.request.prompt)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.num_cached


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int      # tokens already cached
    count: int      # new tokens run this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its last logits give a token."""
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, max_waiting: int, max_tokens_per_step: int):
        self.pool = pool
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def has_room(self) -> bool:
        return len(self.waiting) < self.max_waiting

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_tokens_per_step
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        preempted = False
        # decoders first (one token each), then prefills, each group in admission order: a long
        # prefill never holds back a decoding sequence, whenever either was admitted
        for seq in sorted(self.running, key=lambda s: s.to_compute > 1):
            if budget == 0:
                break
            if seq not in self.running:     # preempted by an earlier sequence this step
                continue
            count = min(seq.to_compute, budget)
            need = self.pool.blocks_for(seq.num_cached + count) - len(seq.blocks)
            while need > self.pool.num_free:
                victim = next((v for v in reversed(self.running) if v is not seq and id(v) not in scheduled), seq)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            seq.blocks += self.pool.allocate(max(need, 0))
            chunks.append(ScheduledChunk(seq, seq.num_cached, count))
            scheduled.add(id(seq))
            budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_batch and not preempted:
            seq = self.waiting[0]
            need = self.pool.blocks_for(len(seq.tokens))
            if need > self.pool.num_free:
                break
            self.waiting.popleft()
            seq.blocks = self.pool.allocate(need)
            self.running.append(seq)
            count = min(seq.to_compute, budget)
            chunks.append(ScheduledChunk(seq, 0, count))
            budget -= count
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_cached = [], 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and give its blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks = []

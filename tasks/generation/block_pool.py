"""The KV-cache block pool: hands out and takes back fixed-size blocks, nothing else.

As in vLLM v1's ``block_pool.py``: the pool knows only which block ids are free. The
scheduler asks it whether a sequence fits (admission is a question asked of the pool, not
a guess) and the cache tensors (``kv_cache.py``) are indexed by the ids it hands out.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs >= 1 block of >= 1 token, got {num_blocks} blocks of {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` cache slots."""
        return -(-tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free (the scheduler must ask first)")
        blocks = [self._free.popleft() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        assert len(self._free) <= self.num_blocks, "a block was freed twice"

    def usage(self) -> dict:
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": self.num_used,
            "block_size": self.block_size,
            "tokens_total": self.num_blocks * self.block_size,
            "tokens_used": self.num_used * self.block_size,
            "fraction_used": self.num_used / self.num_blocks,
            "peak_blocks_used": self.peak_used,
        }

"""The documents of a staging source, in order, read unit by unit (for fitting a tokenizer)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from storage.sources import SourceUnit

#: A tokenizer is fitted on at most this much text (the first documents, in order): BPE
#: merge statistics settle long before, and fitting stays a minute at most.
FIT_MAX_BYTES = 32_000_000


def iter_texts(
    units: Sequence[SourceUnit],
    column: str,
    read: Callable[[SourceUnit], pa.Table],
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
    max_bytes: int = FIT_MAX_BYTES,
) -> Iterator[str]:
    """The texts of ``column`` unit by unit; ``keep(global rows)`` selects rows (a split)."""
    offset, taken = 0, 0
    for unit in units:
        table = read(unit)
        texts: Iterable = table.column(column)
        if keep is not None:
            texts = texts.filter(pa.array(keep(np.arange(offset, offset + table.num_rows))))
        offset += unit.rows
        for text in texts.to_pylist():
            if text:
                yield text
                taken += len(text)
                if taken >= max_bytes:
                    return

"""What a producer hands a consumer through: a bounded queue whose bound can grow, and the
end marker. Shared by the in-process prefetcher (:mod:`storage.prefetch`) and the forked
feed (:mod:`storage.feed`), so neither imports the other for it."""

from __future__ import annotations

import time
from queue import SimpleQueue
from typing import Any

END = object()


class GrowableQueue:
    """A bounded FIFO whose bound can grow while it is in use.

    Two C queues and no condition variable: ``items`` holds what is queued and ``room``
    one token per free place. The producer takes a token before it puts, the consumer
    gives one back after it gets: one call each, blocking (without the GIL) only when
    the queue is full or empty.
    """

    def __init__(self, capacity: int):
        self.capacity = 0
        self.items: SimpleQueue = SimpleQueue()
        self.room: SimpleQueue = SimpleQueue()
        self.stopped = False
        self.grow(capacity)

    def put(self, item) -> bool:
        self.room.get()
        if self.stopped:
            return False
        self.items.put(item)
        return True

    def get(self):
        item = self.items.get()
        self.room.put(None)
        return item

    def take(self) -> tuple[Any, float]:
        """The next item and the wait for it (``None`` once ``END`` was put); an exception put
        in is raised here, in the consumer."""
        started = time.perf_counter()
        item = self.get()
        waited = time.perf_counter() - started
        if item is END:
            return None, waited
        if isinstance(item, BaseException):
            raise item
        return item, waited

    def grow(self, capacity: int) -> None:
        for _ in range(capacity - self.capacity):
            self.room.put(None)
        self.capacity = max(self.capacity, capacity)

    def stop(self) -> None:
        self.stopped = True
        self.room.put(None)  # a producer waiting for room wakes, and stops

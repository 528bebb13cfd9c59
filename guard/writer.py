"""Writes to Redis off the request path: a bounded queue and one thread, for capture and shadow counts.

``submit`` never blocks: when the queue is full, or Redis does not answer, the write is dropped and
counted, so a request is never slowed or failed by what it leaves behind.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
QUEUE_WRITES = 1024  # writes waiting for the thread at most; more are dropped
Write = Callable[[redis.client.Pipeline], None]  # adds its commands to a pipeline


class RedisWriter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        dropped: Callable[[str, str], None] = lambda kind, reason: None,
        written: Callable[[str], None] = lambda kind: None,
    ) -> None:
        """``dropped(kind, reason)`` and ``written(kind)``: counters, ``kind`` the caller's name for a write."""
        self.client, self._dropped, self._written = client, dropped, written
        self._queue: queue.Queue[tuple[str, Write] | None] = queue.Queue(QUEUE_WRITES)
        self._thread = threading.Thread(target=self._run, name="guard-redis-writer", daemon=True)
        self._thread.start()

    def submit(self, kind: str, write: Write) -> None:
        try:
            self._queue.put_nowait((kind, write))
        except queue.Full:
            self._dropped(kind, "queue_full")

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, write = item
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    write(pipe)
                    pipe.execute()
            except RedisError as exc:
                log.warning("a %s write to Redis was dropped (%s)", kind, type(exc).__name__)
                self._dropped(kind, "redis_error")
            else:
                self._written(kind)

"""One task working through one bounded queue: how an event-bus subscriber does slow work (a disk write, an HTTP
delivery) without a deploy ever waiting on it, and without growing without bound behind a stuck disk or peer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Worker(Generic[T]):
    """``put`` never blocks; ``handle`` runs on the worker's own task, one item at a time, in order."""

    def __init__(self, name: str, handle: Callable[[T], Awaitable[None]], maxsize: int) -> None:
        self.name = name
        self._handle = handle
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    def put(self, item: T, *, drop_oldest: bool = False) -> bool:
        """Hand ``item`` over. False when something was lost to a full queue: ``item`` itself, or with
        ``drop_oldest`` the oldest item, to make room for it (the caller counts and logs the loss)."""
        if self._queue.full():
            if not drop_oldest:
                return False
            self._queue.get_nowait()
            self._queue.put_nowait(item)
            return False
        self._queue.put_nowait(item)
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            self._busy = True
            try:
                await self._handle(item)
            except Exception:  # one item's fault never stops the items behind it
                log.exception("%s: an item failed", self.name)
            finally:
                self._busy = False

    @property
    def idle(self) -> bool:
        return not self._busy and self._queue.empty()

    async def drain(self, limit_s: float = 30.0) -> None:
        """Wait (bounded) until every item handed over is handled: at the daemon's stop, and in tests."""
        deadline = time.monotonic() + limit_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Stop the task (an item being handled is cancelled: drain first to finish it)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

"""The bounded worker behind the audit trail and the notifier: never blocks, loses only what it says it lost."""

from __future__ import annotations

import asyncio

import pytest

from deployerd.worker import Worker


@pytest.mark.asyncio
async def test_a_full_queue_refuses_or_drops_the_oldest_and_says_so() -> None:
    seen: list[int] = []
    gate = asyncio.Event()

    async def handle(item: int) -> None:
        await gate.wait()
        seen.append(item)

    w: Worker[int] = Worker("t", handle, maxsize=2)
    w.start()
    assert w.put(1)
    await asyncio.sleep(0)  # the task takes 1 and waits on the gate: the queue is empty again
    assert w.put(2) and w.put(3)
    assert not w.put(4)  # refused: 2 and 3 are kept
    assert not w.put(5, drop_oldest=True)  # 2 dropped for 5
    assert not w.idle
    gate.set()
    await w.drain(limit_s=10)
    assert seen == [1, 3, 5] and w.idle
    await w.close()
    await w.close()  # twice is harmless


@pytest.mark.asyncio
async def test_a_failing_handler_does_not_stop_the_worker_only_its_item() -> None:
    seen: list[int] = []

    async def handle(item: int) -> None:
        if item == 1:
            raise RuntimeError("boom")
        seen.append(item)

    w: Worker[int] = Worker("t", handle, maxsize=4)
    w.start()
    w.put(1)
    w.put(2)
    await w.drain(limit_s=10)
    assert seen == [2]
    await w.close()

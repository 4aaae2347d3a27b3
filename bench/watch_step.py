"""How soon the local-repository watch notices a commit, and what its idle wake-ups cost, per watchfiles ``step``.

deployerd's watch (``GitSource.watch``) runs watchfiles' ``awatch`` on the source's git directory with the same
filter (``is_ref_change``); watchfiles yields once a step passes with nothing new, so a commit is noticed about two
steps after its ref moves. For each step (BENCH_STEPS, default 50,20,10 ms), in one run:
- notice: from a real `git commit` returning to the watch yielding it (BENCH_COMMITS commits, default 15);
- idle: the CPU time of this process over 10 s with the watch running and nothing changing.
Ratios are against the first step named (50 ms: what deployerd used before).

Run: `.venv/bin/python bench/watch_step.py` (no sandbox needed; a temporary repository on this machine).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import med  # noqa: E402
from watchfiles import awatch  # noqa: E402

from deployerd.source import WATCH_STEP_MS, is_ref_change  # noqa: E402

STEPS = [int(x) for x in os.environ.get("BENCH_STEPS", "50,20,10").split(",")]
COMMITS = min(int(os.environ.get("BENCH_COMMITS", "15")), 200)
IDLE_S = 10.0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(step: int, repo: Path) -> tuple[float, float]:
    """(median notice in s, idle CPU s per 10 s) for one step."""
    gitdir = repo / ".git"
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@deployerd.local"]
    stop, seen = asyncio.Event(), asyncio.Queue[float]()

    async def watch() -> None:
        async for _ in awatch(gitdir, watch_filter=lambda _c, p: is_ref_change(gitdir, Path(p)), debounce=200,
                              step=step, stop_event=stop):
            seen.put_nowait(time.monotonic())

    task = asyncio.create_task(watch())
    try:
        await asyncio.sleep(1)
        c0 = cpu()
        await asyncio.sleep(IDLE_S)
        idle = cpu() - c0
        notices = []
        for i in range(COMMITS):
            proc = await asyncio.create_subprocess_exec(*git, "commit", "-q", "--allow-empty", "-m", f"{step} {i}")
            await proc.wait()
            done = time.monotonic()
            notices.append(await asyncio.wait_for(seen.get(), 5) - done)
            await asyncio.sleep(0.3)
            while not seen.empty():
                seen.get_nowait()
        return med(notices), idle
    finally:
        stop.set()
        await task


async def main(repo: Path) -> None:
    results = {step: await measure(step, repo) for step in STEPS}
    base_notice, base_idle = results[STEPS[0]]
    print(f"watch step (deployerd uses {WATCH_STEP_MS} ms): notice after `git commit` returns (median of {COMMITS}), "
          f"idle CPU over {IDLE_S:.0f} s; ratios against step {STEPS[0]} ms")
    for step, (notice, idle) in results.items():
        print(f"  step {step:3d} ms: notice {notice * 1000:6.1f} ms ({notice / base_notice:.2f}x), "
              f"idle CPU {idle * 1000:5.1f} ms per {IDLE_S:.0f} s ({idle / base_idle:.2f}x)")


if __name__ == "__main__":
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    try:
        subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
        subprocess.run(["git", "-C", str(work), "-c", "user.name=bench", "-c", "user.email=bench@deployerd.local",
                        "commit", "-q", "--allow-empty", "-m", "first"], check=True)
        asyncio.run(main(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

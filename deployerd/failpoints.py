"""Test-only failpoints: hold a deploy at a named point so a crash test can kill the daemon exactly there.

Some moments of a deploy last milliseconds (Validation; Start Service between creating the new instance
and starting it), too short to be caught from outside by watching the job. ``await failpoint(name)`` marks
such a moment. It does nothing at all unless the environment variable ``DEPLOYERD_FAILPOINTS`` lists
``name`` (comma-separated); then it logs ``failpoint <name> reached`` and holds the coroutine for
``DEPLOYERD_FAILPOINT_HOLD_S`` seconds (default 60, bounded) before going on, so the test can send SIGKILL.
Never set these variables outside tests.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

ENV = "DEPLOYERD_FAILPOINTS"
HOLD_ENV = "DEPLOYERD_FAILPOINT_HOLD_S"


def armed(name: str) -> bool:
    """Is the failpoint ``name`` switched on by the environment (read at every call: tests set it per process)."""
    names = os.environ.get(ENV, "")
    return bool(names) and name in {n.strip() for n in names.split(",")}


async def failpoint(name: str) -> None:
    """Hold here when ``DEPLOYERD_FAILPOINTS`` names this point (test-only); otherwise return at once."""
    if not armed(name):
        return
    hold = min(float(os.environ.get(HOLD_ENV, "60") or 60), 600.0)
    log.warning("failpoint %s reached: holding %g s (test-only, set by %s)", name, hold, ENV)
    await asyncio.sleep(hold)

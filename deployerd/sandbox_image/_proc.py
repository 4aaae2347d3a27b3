"""Local processes for the sandbox: argv only (never a shell), bounded waits, pid checks against pid reuse."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("deployerd.sandbox")


class SandboxError(RuntimeError):
    """The sandbox could not be brought up or inspected (the message names the step)."""


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


async def run(argv: list[str], *, env: dict[str, str] | None = None, stdin: bytes | None = None,
              check: bool = True, timeout: float | None = 600.0) -> Result:
    """Run a local command (argv, no shell); raise SandboxError naming it when ``check`` and it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}: timed out after {timeout} s") from None
    res = Result(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and res.rc != 0:
        raise SandboxError(f"{' '.join(argv[:3])}... failed ({res.rc}): {res.err.strip()[-800:]}")
    return res


async def pipe(producer: list[str], consumer: list[str], *, logfile: Path,
               env: dict[str, str] | None = None) -> None:
    """``producer | consumer`` without a shell; both must succeed (their messages go to ``logfile``)."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    err = open(logfile, "ab")  # noqa: SIM115 - closed below
    try:
        p1 = await asyncio.create_subprocess_exec(*producer, stdout=w, stderr=err, env=env)
        os.close(w)
        w = -1
        p2 = await asyncio.create_subprocess_exec(*consumer, stdin=r, stdout=err, stderr=err, env=env)
        os.close(r)
        r = -1
        rc1, rc2 = await asyncio.gather(p1.wait(), p2.wait())
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        err.close()
    if rc1 or rc2:
        raise SandboxError(f"{producer[0]} | {consumer[0]} {consumer[1]} failed ({rc1}, {rc2}); see {logfile}")


def spawn_detached(argv: list[str], logpath: Path) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session, so that it outlives the command that started it; output to ``logpath``.

    Blocking (fork and exec): call it through ``asyncio.to_thread``. While the starter waits for the daemon to
    answer, ``poll()`` on the returned handle says whether it died, whatever /proc shows.
    """
    with open(logpath, "ab") as logf:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, close_fds=True)


def pid_alive(pid: int | None, needle: str) -> bool:
    """Is ``pid`` running and really ours (its command line or name holds ``needle``)? Guards against pid reuse.

    A process that has just exec'd can show an empty command line for a moment (seen once in a hundred fresh
    ``sleep``s here), so its name in /proc/PID/stat counts too.
    """
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, rest = stat.split("(", 1)[1].rsplit(")", 1)
    return (needle in cmdline or needle in name) and rest.split()[0] != "Z"


async def terminate(pid: int | None, needle: str, timeout: float = 20.0) -> None:
    """SIGTERM a recorded process of ours, then SIGKILL if it outlives ``timeout``."""
    if not pid_alive(pid, needle):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(int(timeout / 0.1)):
        if not pid_alive(pid, needle):
            return
        await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def file_lock(path: Path, what: str, timeout: float = 3600.0, shared: bool = False) -> AsyncIterator[None]:
    """A flock across processes (a demo and a test run may start at once); exclusive unless ``shared``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(int(timeout)):
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if i == 0:
                    log.info("waiting for another process holding the %s lock (%s)", what, path)
                await asyncio.sleep(1.0)
        else:
            raise SandboxError(f"{what} lock {path} still held after {timeout} s")
        yield
    finally:
        os.close(fd)  # releases the lock


async def logged(argv: list[str], logfile: Path, timeout: float = 1800.0) -> None:
    with open(logfile, "ab") as f:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f,
                                                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SandboxError(f"{argv[0]} timed out; see {logfile}") from None
    if rc != 0:
        raise SandboxError(f"{' '.join(argv[:3])}... failed ({rc}); see {logfile}")

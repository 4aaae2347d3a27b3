"""Host operations as data, executed in one place.

A runtime decides what to do with pure functions that return a list of steps (``Run``: an argv; ``Write``: a
file written atomically); ``execute`` sends the whole list to the host in ONE round trip, where a constant
helper (``python3 -c STEPS``, values only on stdin, never spliced into code or a shell string) runs them in
order and stops at the first step that fails. Tests assert the lists as data, with no host (as Kamal tests its
command arrays).

File contents (an env file holding secrets) travel on stdin, never on a command line; a ``Write`` goes to a
0600 temp name beside its path (the name ``connection.temp_name_pattern`` globs), is chmod-ed, then renamed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

from deployerd.connection import CommandError, CommandTimeout, Connection

_OUTPUT_TAIL = 64 * 1024  # characters of each step's stdout/stderr sent back


@dataclass(frozen=True)
class Run:
    """Run ``argv``; an exit status outside ``ok`` fails the step (``ok=None``: any status is fine)."""

    argv: tuple[str, ...]
    ok: tuple[int, ...] | None = (0,)
    timeout: float = 60

    def __init__(self, *argv: str, ok: tuple[int, ...] | None = (0,), timeout: float = 60) -> None:
        object.__setattr__(self, "argv", tuple(argv))
        object.__setattr__(self, "ok", ok)
        object.__setattr__(self, "timeout", timeout)


@dataclass(frozen=True)
class Write:
    """Write ``data`` to ``path`` atomically with ``mode`` (its folder must exist)."""

    path: str
    data: bytes
    mode: int = 0o644


Step = Run | Write


@dataclass(frozen=True)
class Outcome:
    """One executed step: its exit status and output tails (a Write reports 0 and no output)."""

    exit_status: int
    stdout: str
    stderr: str


STEPS = r"""
import base64, json, os, secrets, subprocess, sys
steps = json.load(sys.stdin)
out = []
for s in steps:
    if "write" in s:
        path = s["write"]
        d, n = os.path.split(path)
        tmp = os.path.join(d, "." + n + ".tmp-" + secrets.token_hex(6))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(s["data"]))
                os.fchmod(f.fileno(), s["mode"])
            os.rename(tmp, path)
            out.append([0, "", ""])
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            out.append([1, "", f"write {path}: {e.strerror}"])
            break
        continue
    try:
        p = subprocess.run(s["run"], capture_output=True, timeout=s["timeout"], stdin=subprocess.DEVNULL)
        code, o, e = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as t:
        code, o, e = None, t.stdout or b"", t.stderr or b""
    except OSError as x:
        code, o, e = 127, b"", (x.strerror or str(x)).encode()
    tail = __TAIL__
    out.append([code, o.decode("utf-8", "replace")[-tail:], e.decode("utf-8", "replace")[-tail:]])
    if code is None or (s["ok"] is not None and code not in s["ok"]):
        break
print(json.dumps(out))
""".replace("__TAIL__", str(_OUTPUT_TAIL))


def payload(steps: Sequence[Step]) -> bytes:
    """What ``STEPS`` reads on stdin."""
    items: list[dict[str, object]] = []
    for s in steps:
        if isinstance(s, Write):
            items.append({"write": s.path, "data": base64.b64encode(s.data).decode(), "mode": s.mode})
        else:
            items.append({"run": list(s.argv), "ok": list(s.ok) if s.ok is not None else None,
                          "timeout": s.timeout})
    return json.dumps(items).encode()


def _name(step: Step) -> str:
    return f"write {step.path}" if isinstance(step, Write) else step.argv[0]


async def execute(conn: Connection, steps: Sequence[Step]) -> list[Outcome]:
    """Run ``steps`` on the host in one round trip; raise CommandError (CommandTimeout) for the first that
    failed, naming only its argv[0] (later arguments may be sensitive). Returns every step's outcome."""
    if not steps:
        return []
    budget = sum(s.timeout for s in steps if isinstance(s, Run)) + 30
    done = await conn.run(["python3", "-c", STEPS], input=payload(steps), timeout=budget, check=False)
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        raise CommandError(conn.host.name, "python3 (steps)", done.exit_status, done.stderr) from None
    outcomes: list[Outcome] = []
    for step, (code, stdout, stderr) in zip(steps, rows, strict=False):  # rows stop at the first failure
        if code is None:
            assert isinstance(step, Run)
            raise CommandTimeout(conn.host.name, _name(step), step.timeout, stderr)
        outcomes.append(Outcome(code, stdout, stderr))
        failed = code != 0 if isinstance(step, Write) else step.ok is not None and code not in step.ok
        if failed:
            raise CommandError(conn.host.name, _name(step), code, stderr)
    if len(outcomes) != len(steps):
        raise CommandError(conn.host.name, "python3 (steps)", done.exit_status, done.stderr)
    return outcomes

"""Where a deploy's time goes, call by call: wraps the daemon's remote calls (SSH commands, SFTP calls, Docker
API requests, HAProxy runtime API lines, health and front-door requests) and its phases, in this process only,
and records each with its start and duration. Bench-only (the daemon runs in the bench's process); nothing in
deployerd/ knows of it.

    trace = Trace.install(); ...; trace.report(since, until)  # the calls between two time.monotonic() marks
"""

from __future__ import annotations

import asyncio
import functools
import shlex
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Call:
    at: float  # monotonic start
    seconds: float
    kind: str
    what: str


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)

    def _wrap(self, owner: Any, name: str, kind: str, describe: Any) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return await original(*args, **kwargs)
            finally:
                try:
                    what = describe(*args, **kwargs)
                except Exception as e:  # a call shaped unlike the describer expects: still counted
                    what = f"? ({e})"
                self.calls.append(Call(t0, time.monotonic() - t0, kind, what))

        def instant(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(Call(time.monotonic(), 0.0, kind, describe(*args, **kwargs)))
            return original(*args, **kwargs)

        setattr(owner, name, timed if asyncio.iscoroutinefunction(original) else instant)

    @classmethod
    def install(cls) -> Trace:
        import aiodocker.docker
        import httpx

        from deployerd import registry_client, snapshot, source, store
        from deployerd.connection import session, sftp
        from deployerd.ingress import proxy

        t = cls()
        t._wrap(session.Connection, "run", "ssh", lambda self, argv, **_: shlex.join(argv)[:90])
        for op in ("put_bytes", "read_bytes", "makedirs", "replace_file", "rename", "remove", "replace_symlink"):
            t._wrap(sftp.RemoteFiles, op, "sftp",
                    functools.partial(lambda op, self, *a, **_: f"{op} {a[0] if a else ''}", op))
        t._wrap(aiodocker.docker.Docker, "_do_query", "docker",
                lambda self, path, method="GET", **_: f"{method} {path}")
        t._wrap(proxy.IngressProxy, "command", "haproxy", lambda self, line: line[:90])
        t._wrap(httpx.AsyncClient, "get", "http", lambda self, url, **_: str(url))
        t._wrap(registry_client.RegistryClient, "register", "registry", lambda self, name, *a, **_: f"register {name}")
        t._wrap(source.Kick, "set", "engine", lambda self, reason: f"kick: {reason}")
        t._wrap(source.GitSource, "fetch", "engine", lambda self: "git fetch")
        t._wrap(snapshot, "observe", "engine", lambda *a, **_: "observe every host")
        t._wrap(snapshot.Planner, "snapshot", "engine", lambda *a, **_: "snapshot (fetch, load, observe, plan)")
        t._wrap(store.Store, "save_job", "store", lambda self, job, *a, **_: f"save job {job.service}")
        t._wrap(store.Store, "save_release", "store", lambda self, rec, *a, **_: "save release")
        return t

    def report(self, since: float, until: float) -> str:
        """The calls that started in [since, until), in order, with their offsets from ``since``."""
        rows = [c for c in self.calls if since <= c.at < until]
        rows.sort(key=lambda c: c.at)
        total: dict[str, float] = {}
        for c in rows:
            total[c.kind] = total.get(c.kind, 0.0) + c.seconds
        lines = [f"      +{c.at - since:6.3f} {c.seconds * 1000:7.1f} ms  {c.kind:7s} {c.what}" for c in rows]
        lines.append("      sum by kind: " + ", ".join(f"{k} {v:.3f} s ({sum(c.kind == k for c in rows)})"
                                                   for k, v in sorted(total.items())))
        return "\n".join(lines)

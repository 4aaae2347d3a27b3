"""Drive one host's ingress proxy over its SSH connection: its unit and config, the switch, the drain.

The runtime API is HAProxy's admin unix socket on the host, forwarded over the host's one SSH connection
(as the Docker socket is): no port of the proxy's is open to any network. The config file is deployerd's
record of what each service's frontend serves; it is parsed back (``parse_config``) to change one route, and
rewritten before every runtime switch so a proxy that restarts serves what was switched to.

Every failure raises ``IngressError`` naming the host; none of them stops what the proxy already serves: a
refused config never replaces the running one, and a switch is one runtime command that either happens or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from deployerd.connection import CommandError, Connection, HostUnreachable, RemoteFileError
from deployerd.ingress.config import (
    ADMIN_SOCKET,
    CONFIG_PATH,
    HAPROXY,
    LOCK_PATH,
    LOCK_WAIT_S,
    UNIT,
    UNIT_NAME,
    UNIT_PATH,
    UPSTREAM_HEADER,
    ProxyState,
    Route,
    enable_command,
    frontends_open,
    lock_command,
    parse_in_flight,
    parse_servers_state,
    remove_command,
    render_config,
    runtime_errors,
    switch_command,
)

_host_locks: dict[str, asyncio.Lock] = {}  # this process's side of a host's lock (its services deploy in parallel)


class IngressError(Exception):
    """The host's proxy is dead, refused its config, or could not bind a public port; names the host.
    Transient: what serves keeps serving, and the next reconcile tries again."""

    transient = True

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"host {host}: ingress proxy: {reason}")
        self.host = host


def parse_config(text: str) -> list[Route]:
    """The routes of a config ``render_config`` wrote (frontend, bind port, the backend's server)."""
    routes: dict[str, Route] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(frontend|backend) (fe|be)_(\S+)", line):
            current = m.group(3)
            routes.setdefault(current, Route(current, 0))
        elif m := re.fullmatch(r"bind :(\d+)", line):
            routes[current] = Route(current, int(m.group(1)), routes[current].release, routes[current].upstream_port)
        elif m := re.fullmatch(r"server (\S+) 127\.0\.0\.1:(\d+)", line):
            routes[current] = Route(current, routes[current].port, m.group(1), int(m.group(2)))
    return [r for r in routes.values() if r.port]


@dataclass
class Switched:
    before: str | None  # release served before (None: nothing did)
    after: str
    seconds: float


class IngressProxy:
    """One host's proxy. Cheap to build: holds only the connection and this process's lock of the host."""

    def __init__(self, conn: Connection, host: str, drain_timeout_s: float = 30.0) -> None:
        self.conn, self.host, self.drain_timeout_s = conn, host, drain_timeout_s
        self.lock = _host_locks.setdefault(host, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """The right to change the host's proxy: this process's lock, then the host's (``LOCK_PATH``, held by a
        process on the host for as long as the block runs), so daemons sharing the host never interleave their
        read, change and rewrite of the config. The host lets go when the block ends, the daemon dies or its
        connection is lost: the holder's stdin closes."""
        async with self.lock, self.conn.stream(lock_command(LOCK_WAIT_S)) as lines:
            try:
                said = (await asyncio.wait_for(anext(lines, ""), LOCK_WAIT_S + 10)).strip()
            except TimeoutError:
                said = "no answer"
            if said != "held":
                why = f"held by another process for over {LOCK_WAIT_S}s" if said == "busy" else said or "no answer"
                raise IngressError(self.host, f"could not take its lock {LOCK_PATH}: {why}")
            yield

    # -- runtime API

    async def command(self, line: str) -> str:
        """One runtime API call over the forwarded admin socket."""
        try:
            local = await self.conn.forwarded_socket(ADMIN_SOCKET)
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(local), 10)
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
        except HostUnreachable:
            raise
        except (TimeoutError, OSError) as e:
            raise IngressError(self.host, f"its admin socket does not answer ({type(e).__name__})") from None
        self.conn.stats.commands += 1
        if not answer:  # the forward opened but the proxy behind it is gone
            raise IngressError(self.host, "its admin socket does not answer (not running?)")
        return answer.decode(errors="replace")

    async def state(self) -> ProxyState:
        return parse_servers_state(await self.command("show servers state"))

    async def running(self) -> bool:
        return (await self.conn.run(["systemctl", "is-active", "--quiet", UNIT_NAME], check=False)).ok

    # -- unit and config

    async def _read(self, path: str) -> str | None:
        try:
            return (await self.conn.read_bytes(path)).decode()
        except RemoteFileError as e:
            if e.not_found:
                return None
            raise

    async def routes(self) -> list[Route]:
        return parse_config(await self._read(CONFIG_PATH) or "")

    async def apply(self, routes: list[Route]) -> dict[str, object]:
        """Make the proxy run with ``routes``: unit installed, config checked then written, proxy (re)started or
        reloaded, every route's frontend bound. Call inside ``changing()``."""
        return await self._apply(routes, await self._read(CONFIG_PATH))

    async def _apply(self, routes: list[Route], config: str | None) -> dict[str, object]:
        """``apply`` with the config file as the caller read it under the lock (None: absent): read once."""
        done: dict[str, object] = {}
        if await self._read(UNIT_PATH) != UNIT:
            await self.conn.put_bytes(UNIT_PATH, UNIT.encode())
            await self.conn.run(["systemctl", "daemon-reload"])
            await self.conn.run(["systemctl", "enable", UNIT_NAME], check=False)
            done["unit_written"] = True
        text = render_config(routes, self.drain_timeout_s)
        changed = config != text
        if not changed and not done and await self._bound(routes):
            return done  # the runtime API answers with every frontend bound: it runs (no systemctl needed)
        if changed:
            await self._check_ports(routes)
            await self.conn.makedirs(CONFIG_PATH.rsplit("/", 1)[0])
            candidate = f"{CONFIG_PATH}.new"
            await self.conn.put_bytes(candidate, text.encode(), mode=0o600)
            check = await self.conn.run([HAPROXY, "-c", "-q", "-f", candidate], check=False)
            if not check.ok:
                raise IngressError(self.host, f"refused its config: {(check.stderr or check.stdout).strip()[-400:]}")
            await self.conn.rename(candidate, CONFIG_PATH)
            done["config_written"] = True
        running = await self.running()
        if not running or changed:
            action = "reload" if running else "restart"
            result = await self.conn.run(["systemctl", action, UNIT_NAME], check=False)
            if not result.ok:
                raise IngressError(self.host, f"systemctl {action} {UNIT_NAME} failed: {result.stderr.strip()[-300:]}")
            done[action] = True
        await self._wait_bound(routes)
        return done

    async def _check_ports(self, routes: list[Route]) -> None:
        """A public port held by anything but our proxy is an error naming the host, the port and the holder."""
        listening = await self.conn.run(["ss", "-Hltnp"], check=False)
        for r in routes:
            for line in listening.stdout.splitlines():
                f = line.split()
                if len(f) >= 4 and f[3].rsplit(":", 1)[-1] == str(r.port) and "haproxy" not in line:
                    holder = f[5] if len(f) > 5 else "another process"
                    raise IngressError(self.host, f"public port {r.port} of {r.service} is taken by {holder}")

    async def _bound(self, routes: list[Route]) -> bool:
        """Does the running proxy have every route's frontend bound (False too when it does not answer)?"""
        try:
            return not {r.service for r in routes} - frontends_open(await self.command("show stat"))
        except IngressError:
            return False

    async def _wait_bound(self, routes: list[Route], limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        want = {r.service for r in routes}
        last = "no answer"
        while True:
            try:
                missing = want - frontends_open(await self.command("show stat"))
                if not missing:
                    return
                last = f"frontends not bound: {', '.join(sorted(missing))}"
            except IngressError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise IngressError(self.host, f"not serving after start or reload ({last})")
            await asyncio.sleep(0.1)

    async def ensure_route(self, service: str, port: int, release: str | None = None,
                           upstream_port: int | None = None) -> dict[str, object]:
        """The service's frontend exists on ``port``: its backend keeps what it serves, or, new, binds the port
        already serving ``release`` on ``upstream_port`` (no moment of a frontend without a server)."""
        async with self.changing():
            have = await self._read(CONFIG_PATH)
            routes = {r.service: r for r in parse_config(have or "")}
            old = routes.get(service)
            fresh = release is not None and (old is None or old.release is None)
            if not fresh and old is not None:
                release, upstream_port = old.release, old.upstream_port
            routes[service] = Route(service, port, release, upstream_port)
            done = await self._apply(list(routes.values()), have)
            return {**done, "serving_from_start": release} if fresh and done else done

    async def remove_route(self, service: str) -> dict[str, object]:
        """The service's route goes, if the config has one; whatever the host's ``ingress`` says now (a host
        moved to ``ingress: none`` still has its proxy's config), and nothing is installed where no config is."""
        async with self.changing():
            have = await self._read(CONFIG_PATH)
            routes = parse_config(have or "")
            if not any(r.service == service for r in routes):
                return {}
            return {**await self._apply([r for r in routes if r.service != service], have), "route_removed": service}

    # -- switch and drain

    async def switch(self, service: str, release: str, port: int) -> Switched:
        """Send new requests of ``service`` to ``release`` on ``port``; the others drain. Atomic: one runtime
        line. The config file is written first, so a proxy that restarts meanwhile comes back switched."""
        t0 = time.monotonic()
        async with self.changing():
            routes = {r.service: r for r in await self.routes()}
            route = routes.get(service)
            if route is None:
                raise IngressError(self.host, f"no frontend for {service}")
            servers = (await self.state()).servers.get(service, [])
            before = next((s.name for s in servers if s.active), None)
            have = {s.name: s for s in servers}
            stale = [s.name for s in servers if s.name == release and s.port != port]
            for name in stale:  # a server of this name on another port (a re-created instance): replace it
                await self._run(remove_command(service, name))
                del have[name]
            others = [n for n in have if n != release]
            line = enable_command(service, release, others) if release in have else \
                switch_command(service, release, port, others)
            await self.conn.put_bytes(CONFIG_PATH, render_config(
                [*(r for r in routes.values() if r.service != service), Route(service, route.port, release, port)],
                self.drain_timeout_s).encode(), mode=0o600)
            await self._run(line)
        return Switched(before=before, after=release, seconds=round(time.monotonic() - t0, 3))

    async def _run(self, line: str) -> None:
        if errors := runtime_errors(await self.command(line)):
            raise IngressError(self.host, f"runtime API refused {line!r}: {'; '.join(errors)}")

    async def drain(self, service: str, release: str, timeout_s: float | None = None) -> float:
        """Wait until no request is in flight on ``release`` (bounded by the drain timeout), then remove it from
        the backend. Returns the seconds waited."""
        limit = self.drain_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            left = parse_in_flight(await self.command("show stat"), service, release)
            if not left:
                break
            await asyncio.sleep(0.05)
        waited = round(time.monotonic() - t0, 3)
        async with self.lock:
            if parse_in_flight(await self.command("show stat"), service, release) is not None:
                await self._run(remove_command(service, release))
        return waited

    async def front_door(self, client: httpx.AsyncClient, port: int, path: str) -> str:
        """The release that answers a request through the public port (the proxy's upstream header)."""
        try:
            async with self.conn.forwarded_port(port) as local:
                resp = await client.get(f"http://127.0.0.1:{local}{path}", timeout=10)
        except httpx.HTTPError as e:
            raise IngressError(self.host, f"public port {port} does not answer: {type(e).__name__}") from None
        return str(resp.headers.get(UPSTREAM_HEADER, ""))


__all__ = ["CommandError", "IngressError", "IngressProxy", "Switched", "parse_config"]

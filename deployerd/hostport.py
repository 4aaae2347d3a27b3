"""The phase runner's one way to a host: its runtimes, its lock, its folders, Transfer, the health wait and,
behind an ingress proxy, the switch.

``SSHHostPort`` does these over the host's pooled SSH connection (``runtimes.HostHandle``); unit tests of the
phase runner swap in a fake (tests/unit/fakes.py) and run deploys, rollbacks and failures in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import httpx

from deployerd.health import HealthResult, wait_healthy
from deployerd.ingress import IngressProxy
from deployerd.locks import HostLock, HostLocks
from deployerd.runtimes import HostHandle, ReleaseContext, Runtime
from deployerd.switch import retire, switch_to
from deployerd.transfer import transfer
from deployerd.tree import Tree


class Lock(Protocol):
    """One service's lock on one host for one job (``locks.HostLock``)."""

    async def acquire(self) -> dict[str, Any]: ...

    async def release(self) -> None: ...


class HostPort(Protocol):
    """What the phase runner needs of one host."""

    @property
    def name(self) -> str: ...

    def runtime(self, method: str) -> Runtime: ...

    def lock(self, locks: HostLocks, name: str, job: str) -> Lock: ...

    async def prepare(self, ctx: ReleaseContext) -> None:
        """Create the release's service folder."""

    async def transfer(self, tree: Tree, ctx: ReleaseContext, previous: str | None) -> dict[str, Any]: ...

    async def wait_healthy(self, http: httpx.AsyncClient, runtime: Runtime, ctx: ReleaseContext,
                           stop: Callable[[], bool], port: int | None = None) -> HealthResult: ...

    async def switch(self, runtime: Runtime, ctx: ReleaseContext, http: httpx.AsyncClient,
                     private_port: int) -> dict[str, Any]:
        """Behind the host's ingress proxy: send the public port's requests to ``ctx``'s proven instance and prove
        it through the front door."""

    async def retire(self, runtime: Runtime, ctx: ReleaseContext, before: str | None) -> dict[str, Any]:
        """Behind the host's ingress proxy, after the switch: drain ``before``, stop the others (kept)."""

    async def serving(self, ctx: ReleaseContext) -> str | None:
        """Behind the host's ingress proxy: the release it sends ``ctx``'s service's requests to."""


class SSHHostPort:
    """A host reached over its one SSH connection."""

    def __init__(self, handle: HostHandle) -> None:
        self.handle = handle

    @property
    def name(self) -> str:
        return self.handle.spec.name

    def runtime(self, method: str) -> Runtime:
        return self.handle.runtime(method)

    def lock(self, locks: HostLocks, name: str, job: str) -> HostLock:
        return locks.lock(self.handle.conn, self.handle.spec.base_dir, name, job)

    async def prepare(self, ctx: ReleaseContext) -> None:
        """The service dir with deployerd's marker (or refused, ForeignDirectory, when it is not ours)."""
        await self.handle.runtime(ctx.spec.method).claim(ctx.spec.name)

    async def transfer(self, tree: Tree, ctx: ReleaseContext, previous: str | None) -> dict[str, Any]:
        return await transfer(self.handle.conn, tree, ctx, previous)

    async def wait_healthy(self, http: httpx.AsyncClient, runtime: Runtime, ctx: ReleaseContext,
                           stop: Callable[[], bool], port: int | None = None) -> HealthResult:
        return await wait_healthy(http, self.handle.conn, runtime, ctx, stop, port)

    async def switch(self, runtime: Runtime, ctx: ReleaseContext, http: httpx.AsyncClient,
                     private_port: int) -> dict[str, Any]:
        return await switch_to(self.handle.conn, runtime, ctx, http, private_port)

    async def retire(self, runtime: Runtime, ctx: ReleaseContext, before: str | None) -> dict[str, Any]:
        return await retire(self.handle.conn, runtime, ctx, before)

    async def serving(self, ctx: ReleaseContext) -> str | None:
        active = (await IngressProxy(self.handle.conn, ctx.host.name).state()).active(ctx.qualified_name)
        return None if active is None else active.name


def port_of(handle: HostHandle | HostPort) -> HostPort:
    return SSHHostPort(handle) if isinstance(handle, HostHandle) else handle

"""A fake runtime, host port and Registry for unit tests of the phase runner (deployerd.phases).

The fake host keeps its state in memory: which releases are built, which one runs, what failed. Faults are
set per release and phase (``host.fail[(release, phase)] = error``) or as a health that never passes; the
runner sees them through the same interfaces as the SSH host (``HostPort``, ``Runtime``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from deployerd.desired import HostSpec, ServiceSpec, compute_release
from deployerd.health import HealthInterrupted, HealthResult
from deployerd.locks import HostLocks
from deployerd.observed import Instance, RegistryEntry, RunState
from deployerd.runtimes.base import BuildResult, Output, ReleaseContext, Removed, Runtime, StartError, StartResult
from deployerd.tree import Entry, Tree

HOST = HostSpec(name="fake-1", address="10.0.0.1")
INGRESS_HOST = HostSpec(name="fake-1", address="10.0.0.1", ingress="haproxy")


def context(name: str = "web", version: str = "1", host: HostSpec = HOST, **spec: Any) -> ReleaseContext:
    """A release context of a service whose source differs by ``version`` (on ``host``: INGRESS_HOST puts it
    behind a proxy)."""
    s = ServiceSpec.model_validate({"name": name, "host": host.name, "port": 8080, "source": f"services/{name}",
                                    **spec})
    entries = [Entry(path=f"services/{name}/index.html", kind="file", mode=0o100644, sha=version * 40, size=1)]
    return ReleaseContext(spec=s, host=host, release=compute_release(s, host, entries), commit=f"c{version}")


class FakeTree:
    def close(self) -> None:
        pass


TREE: Tree = FakeTree()  # type: ignore[assignment]


@dataclass
class FakeLock:
    host: FakeHost

    async def acquire(self) -> dict[str, Any]:
        self.host.locked += 1
        return {"waited_for": None}

    async def release(self) -> None:
        self.host.locked -= 1


class FakeRuntime(Runtime):
    method = "docker"

    def __init__(self, host: FakeHost) -> None:
        super().__init__(None, HOST)  # type: ignore[arg-type]
        self.fake = host

    def _fault(self, ctx: ReleaseContext, phase: str) -> None:
        if (err := self.fake.fail.get((ctx.release.id, phase))) is not None:
            raise err

    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        running = self.fake.running
        return ([Instance(service=s, host=HOST.name, method=self.method, release=r, commit="",
                          state=RunState.RUNNING) for s, r in running.items()],
                {s: sorted(self.fake.built) for s in running})

    async def has_instances(self, service: str) -> bool:
        return service in self.fake.running

    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        return ctx.release.id in self.fake.built

    async def build(self, ctx: ReleaseContext) -> BuildResult:
        self.fake.calls.append(("build", ctx.release.id))
        self._fault(ctx, "Build")
        self.fake.built.add(ctx.release.id)
        return BuildResult(f"img:{ctx.release.id}", {"image": f"img:{ctx.release.id}"})

    async def start(self, ctx: ReleaseContext) -> StartResult:
        self.fake.calls.append(("start", ctx.release.id))
        self._fault(ctx, "Start Service")
        previous = self.fake.running.get(ctx.spec.name)
        self.fake.running[ctx.spec.name] = ctx.release.id
        reused = ctx.release.id in self.fake.started
        self.fake.started.add(ctx.release.id)
        private = 20000 + len(self.fake.started) if ctx.behind_ingress else None
        return StartResult(f"c-{ctx.release.id}", reused, previous, private_port=private)

    async def state(self, ctx: ReleaseContext) -> RunState | None:
        return RunState.RUNNING if self.fake.running.get(ctx.spec.name) == ctx.release.id else RunState.STOPPED

    async def logs(self, ctx: ReleaseContext, lines: int = 40) -> Output:
        return Output([f"log of {ctx.release.id}"], 3)

    async def discard(self, ctx: ReleaseContext) -> None:
        self.fake.calls.append(("discard", ctx.release.id))
        if self.fake.running.get(ctx.spec.name) == ctx.release.id:
            del self.fake.running[ctx.spec.name]

    async def remove_service(self, service: str) -> Removed:
        self.fake.calls.append(("remove_service", service))
        self.fake.running.pop(service, None)
        gone, self.fake.built = sorted(self.fake.built), set()
        return Removed(gone)

    async def retain(self, service: str, keep: list[str]) -> Removed:
        gone = sorted(self.fake.built - set(keep))
        self.fake.built &= set(keep)
        return Removed(gone)


@dataclass
class FakeHost:
    """The fake host port (``hostport.HostPort``) and the state its fake runtime changes."""

    built: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    running: dict[str, str] = field(default_factory=dict)  # service -> release that runs
    fail: dict[tuple[str, str], BaseException] = field(default_factory=dict)  # (release, phase) -> error
    unhealthy: set[str] = field(default_factory=set)  # releases whose health never passes
    on_health: Callable[[ReleaseContext], None] | None = None  # called once per health wait (e.g. a new commit)
    calls: list[tuple[str, str]] = field(default_factory=list)
    locked: int = 0
    # behind the fake proxy (contexts on INGRESS_HOST): what serves, and how retiring the old release goes
    serves: dict[str, str] = field(default_factory=dict)  # service -> release the proxy sends requests to
    retire_gate: asyncio.Event | None = None  # retire waits for it (bounded) before it stops the old release
    retire_fail: BaseException | None = None  # the next retirement fails with it

    def __post_init__(self) -> None:
        self.rt = FakeRuntime(self)

    @property
    def name(self) -> str:
        return HOST.name

    def runtime(self, method: str) -> Runtime:
        return self.rt

    def lock(self, locks: HostLocks, name: str, job: str) -> FakeLock:
        return FakeLock(self)

    async def prepare(self, ctx: ReleaseContext) -> None:
        self.rt._fault(ctx, "Validation")

    async def transfer(self, tree: Tree, ctx: ReleaseContext, previous: str | None) -> dict[str, Any]:
        self.calls.append(("transfer", ctx.release.id))
        self.rt._fault(ctx, "Transfer")
        return {"files_sent": 1}

    async def wait_healthy(self, http: httpx.AsyncClient, runtime: Runtime, ctx: ReleaseContext,
                           stop: Callable[[], bool], port: int | None = None) -> HealthResult:
        self.calls.append(("health", ctx.release.id))
        if self.on_health is not None:
            self.on_health(ctx)
        self.rt._fault(ctx, "Verify Health")
        if ctx.release.id in self.unhealthy:
            await asyncio.sleep(0)
            if stop():
                raise HealthInterrupted("stopped waiting")
            raise StartError(f"{ctx.spec.name} not healthy", ["boom"])
        return HealthResult("http://fake/health", 200, 1, 0.0)

    async def switch(self, runtime: Runtime, ctx: ReleaseContext, http: httpx.AsyncClient,
                     private_port: int) -> dict[str, Any]:
        self.calls.append(("switch", ctx.release.id))
        before = self.serves.get(ctx.spec.name)
        self.serves[ctx.spec.name] = ctx.release.id
        return {"upstream_before": before, "upstream_after": ctx.release.id, "front_door": ctx.release.id,
                "switch_seconds": 0.01, "private_port": private_port}

    async def retire(self, runtime: Runtime, ctx: ReleaseContext, before: str | None) -> dict[str, Any]:
        self.calls.append(("retire", before or ""))
        if self.retire_gate is not None:
            await asyncio.wait_for(self.retire_gate.wait(), 5)
        if self.retire_fail is not None:  # once: a rollback's own retirement then works
            error, self.retire_fail = self.retire_fail, None
            raise error
        self.calls.append(("retired", before or ""))
        return {"drain_seconds": 0.02, "stopped": [before] if before else []}

    async def serving(self, ctx: ReleaseContext) -> str | None:
        return self.serves.get(ctx.spec.name)


class FakeRegistry:
    def __init__(self) -> None:
        self.entries: dict[str, RegistryEntry] = {}
        self.fail: BaseException | None = None

    async def register(self, name: str, endpoint: str, metadata: dict[str, Any],
                       droplet_id: int | None = None) -> RegistryEntry:
        if self.fail is not None:  # once: the rollback's registration then works
            error, self.fail = self.fail, None
            raise error
        entry = RegistryEntry(id=len(self.entries) + 1, name=name, endpoint=endpoint, status="active",
                              metadata=metadata)
        self.entries[name] = entry
        return entry

    async def deregister(self, name: str) -> bool:
        return self.entries.pop(name, None) is not None

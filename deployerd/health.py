"""Verify Health: poll the service's health path through the host's SSH connection until it answers 2xx.

The probe goes through the SSH connection to the host's loopback (no port needs to be open to the daemon's
network), or to the URL the manifest gives. Between probes the runtime is asked whether the release still
runs, so a container that exits or a unit that fails ends the wait at once instead of after the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from deployerd.connection import Connection
from deployerd.desired import ServiceSpec
from deployerd.observed import RunState
from deployerd.runtimes.base import ReleaseContext, Runtime, StartError

MAX_TARGET_ROUNDS = 4  # reads of where a release answers, in one Verify Health


class HealthInterrupted(Exception):
    """The caller asked to stop waiting (a newer commit superseded the release)."""


def probe_client() -> httpx.AsyncClient:
    """The one HTTP client every health wait shares.

    Building an httpx client loads the CA bundle (about 90 ms of CPU on the event loop, and memory that
    glibc keeps), so it is built once per daemon, not once per deploy. No keep-alive: a probe after a
    restart must not reuse a connection to the process that was replaced.
    """
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))


@dataclass
class HealthResult:
    url: str
    status_code: int
    attempts: int
    seconds: float


async def wait_healthy(
    client: httpx.AsyncClient,
    conn: Connection,
    runtime: Runtime,
    ctx: ReleaseContext,
    stop: Callable[[], bool] = lambda: False,
    port: int | None = None,
) -> HealthResult:
    """Return once the release answers 2xx on its health path; raise StartError with its logs otherwise.

    ``client`` is the daemon's shared ``probe_client()``. ``stop`` is asked between probes: when it says
    so, the wait ends with HealthInterrupted. ``port``: the instance's private port behind an ingress proxy
    (it is proven there, before the proxy sends it anything; a manifest's ``health.url`` is not used then).
    """
    spec = ctx.spec
    if spec.health.url and port is None:
        return await _poll(client, runtime, ctx, spec.health.url, spec.health.url, stop)
    if port is not None:  # behind an ingress: the one new instance, on its private port of the host
        async with conn.forwarded_port(port) as local:
            return await _poll(client, runtime, ctx, f"http://127.0.0.1:{local}{spec.health.path}",
                               f"http://{runtime.host.name}:{port}{spec.health.path} (via SSH)", stop)
    return await _each_target(client, conn, runtime, ctx, stop)


async def _each_target(client: httpx.AsyncClient, conn: Connection, runtime: Runtime, ctx: ReleaseContext,
                       stop: Callable[[], bool]) -> HealthResult:
    """Every place the release answers on its port must answer (a cluster's every task's node); a task
    rescheduled meanwhile (a node lost) is probed too. Bounded: one more round per place found."""
    spec, start = ctx.spec, time.monotonic()
    probed: set[tuple[str, str]] = set()
    result: HealthResult | None = None
    attempts = 0
    for _ in range(MAX_TARGET_ROUNDS):
        targets = set(await runtime.health_targets(ctx))
        if not targets:
            raise StartError(f"{spec.name} release {ctx.release.id} has no task running to probe",
                             (await runtime.logs(ctx)).lines)
        if targets <= probed:
            break
        for address, name in sorted(targets - probed):
            via = "via SSH" if address == "127.0.0.1" else f"via {runtime.host.name} over SSH"
            async with conn.forwarded_port(spec.port, address) as local:
                result = await _poll(client, runtime, ctx, f"http://127.0.0.1:{local}{spec.health.path}",
                                     f"http://{name}:{spec.port}{spec.health.path} ({via})", stop)
            attempts += result.attempts
            probed.add((address, name))
    assert result is not None
    if len(probed) == 1:
        return result
    names = ",".join(sorted(n for _, n in probed))
    return HealthResult(f"http://{{{names}}}:{spec.port}{spec.health.path}", result.status_code, attempts,
                        round(time.monotonic() - start, 3))


async def _poll(
    client: httpx.AsyncClient, runtime: Runtime, ctx: ReleaseContext, base_url: str, shown: str,
    stop: Callable[[], bool],
) -> HealthResult:
    """Probe ``base_url`` every ``interval_s`` until 2xx, the release stops running, or ``timeout_s``."""
    spec, release = ctx.spec, ctx.release.id
    start = time.monotonic()
    deadline = start + spec.health.timeout_s
    attempts, last = 0, "no answer yet"
    timeout = min(5.0, spec.health.timeout_s)
    while True:
        if stop():
            raise HealthInterrupted(f"stopped waiting for {shown} after {attempts} probes")
        attempts += 1
        state = await runtime.state(ctx)
        if state is not RunState.RUNNING:
            out = await runtime.logs(ctx)
            what = "is gone" if state is None else f"is {state.value}"
            if out.exit_code is not None:
                what += f" (exit code {out.exit_code})"
            if out.reason:
                what += f" ({out.reason})"
            raise StartError(f"{spec.name} release {release} {what} while waiting for health", out.lines)
        try:
            resp = await client.get(base_url, timeout=timeout)
            if 200 <= resp.status_code < 300:
                return HealthResult(shown, resp.status_code, attempts, round(time.monotonic() - start, 3))
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        if time.monotonic() + spec.health.interval_s > deadline:
            out = await runtime.logs(ctx)
            raise StartError(
                f"{shown} not healthy within {spec.health.timeout_s:g} s ({attempts} probes, last: {last})",
                out.lines,
            )
        await asyncio.sleep(spec.health.interval_s)


async def probe_once(client: httpx.AsyncClient, conn: Connection, spec: ServiceSpec,
                     address: str = "127.0.0.1") -> tuple[bool, str]:
    """One probe of a running service's health path (as Verify Health does it): (passed, what it answered).
    ``address``: where it answers as seen from the host (a Swarm task's node).

    For the status model between deploys: "Healthy" means this answered 2xx at the last check."""
    try:
        async with contextlib.AsyncExitStack() as scope:
            if spec.health.url:
                url = spec.health.url
            else:
                local = await scope.enter_async_context(conn.forwarded_port(spec.port, address))
                url = f"http://127.0.0.1:{local}{spec.health.path}"
            resp = await client.get(url, timeout=min(5.0, spec.health.timeout_s))
    except httpx.HTTPError as e:
        return False, f"{spec.health.url or spec.health.path}: {type(e).__name__}"
    except Exception as e:  # the tunnel (host gone meanwhile): not a verdict on the service
        return False, f"probe failed: {type(e).__name__}: {e}"
    return 200 <= resp.status_code < 300, f"{spec.health.url or spec.health.path}: HTTP {resp.status_code}"

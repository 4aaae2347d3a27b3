"""Verify Health: poll the service's health path through the host's SSH connection until it answers 2xx.

The probe goes through the SSH connection to the host's loopback (no port needs to be open to the daemon's
network), or to the URL the manifest gives. Between probes the runtime is asked whether the release still
runs, so a container that exits or a unit that fails ends the wait at once instead of after the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from deployerd.connection import Connection
from deployerd.desired import ServiceSpec
from deployerd.observed import RunState
from deployerd.runtimes.base import Runtime, StartError

MAX_TARGET_ROUNDS = 4


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
    spec: ServiceSpec,
    release: str,
    stop: Callable[[], bool] = lambda: False,
) -> HealthResult:
    """Return once the release answers 2xx on its health path; raise StartError with its logs otherwise.

    ``client`` is the daemon's shared ``probe_client()``. ``stop`` is asked between probes: when it says
    so, the wait ends with HealthInterrupted.
    """
    if spec.health.url:
        return await _poll(client, runtime, spec, release, spec.health.url, spec.health.url, stop)
    start = time.monotonic()
    probed: set[tuple[str, str]] = set()
    result: HealthResult | None = None
    attempts = 0
    # Each place the release answers (a cluster's every task) must answer; a task rescheduled meanwhile
    # (a node lost) is probed too. Bounded: one more round per place found.
    for _ in range(MAX_TARGET_ROUNDS):
        targets = set(await runtime.health_targets(spec.name, release))
        if not targets:
            raise StartError(f"{spec.name} release {release} has no task running to probe")
        if targets <= probed:
            break
        for address, name in sorted(targets - probed):
            async with conn.forwarded_port(spec.port, address) as local:
                via = "via SSH" if address == "127.0.0.1" else f"via {runtime.host.name} over SSH"
                shown = f"http://{name}:{spec.port}{spec.health.path} ({via})"
                result = await _poll(client, runtime, spec, release, f"http://127.0.0.1:{local}{spec.health.path}",
                                     shown, stop)
            attempts += result.attempts
            probed.add((address, name))
    assert result is not None
    if len(probed) == 1:
        return result
    names = ", ".join(sorted(n for _, n in probed))
    return HealthResult(f"http://{{{names}}}:{spec.port}{spec.health.path}", result.status_code, attempts,
                        round(time.monotonic() - start, 3))


async def _poll(
    client: httpx.AsyncClient, runtime: Runtime, spec: ServiceSpec, release: str, base_url: str, shown: str,
    stop: Callable[[], bool],
) -> HealthResult:
    """Probe ``base_url`` every ``interval_s`` until 2xx, the release stops running, or ``timeout_s``."""
    start = time.monotonic()
    deadline = start + spec.health.timeout_s
    attempts, last = 0, "no answer yet"
    timeout = min(5.0, spec.health.timeout_s)
    while True:
        if stop():
            raise HealthInterrupted(f"stopped waiting for {shown} after {attempts} probes")
        attempts += 1
        state = await runtime.state(spec.name, release)
        if state is not RunState.RUNNING:
            logs = await runtime.logs(spec.name, release)
            what = "is gone" if state is None else f"is {state.value}"
            raise StartError(f"{spec.name} release {release} {what} while waiting for health", logs)
        try:
            resp = await client.get(base_url, timeout=timeout)
            if 200 <= resp.status_code < 300:
                return HealthResult(shown, resp.status_code, attempts, round(time.monotonic() - start, 3))
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        if time.monotonic() + spec.health.interval_s > deadline:
            logs = await runtime.logs(spec.name, release)
            raise StartError(
                f"{shown} not healthy within {spec.health.timeout_s:g} s ({attempts} probes, last: {last})",
                logs,
            )
        await asyncio.sleep(spec.health.interval_s)

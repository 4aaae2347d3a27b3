"""The switch behind a host's ingress proxy: proven new instance in, old one drained, stopped and kept.

Called by the phase runner once the new release answered its health check on its private port (deploy,
rollback and restore alike). In order:

1. the service's frontend exists on its public port (the proxy started again if it had died); an instance of
   the service deployed before the host had the proxy, which binds that port itself, stops first (the one
   moment of such a migration where requests fail: it lasts until the proxy has bound the port);
2. the proxy sends new requests to the new release, atomically (one runtime API line);
3. a request through the public port must come back from the new release (the proxy names the server that
   answered): only then does the job go on to Register;
4. (``retire``) the old release drains: requests in flight finish, bounded by the manifest's
   ``drain_timeout_s``;
5. the old instance stops and is kept for rollback.

The phase runner runs 4-5 while it registers the proven release (the Registry need not wait for the old one's
requests and stop: about 0.2 s of a Docker stop, or a whole drain, measured by bench/reconcile_bench.py), and
the job ends only when both are done; a failure of 4-5 fails Verify Health as before.
A failure before 2 leaves the old release serving, untouched. A failure in 3 switches back to what served.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from deployerd.connection import Connection
from deployerd.failpoints import failpoint
from deployerd.ingress import IngressError, IngressProxy
from deployerd.runtimes.base import ReleaseContext, Runtime

FRONT_DOOR_TRIES = 20


async def switch_to(conn: Connection, runtime: Runtime, ctx: ReleaseContext, http: httpx.AsyncClient,
                    private_port: int) -> dict[str, Any]:
    """Switch ``ctx.spec``'s public port to ``ctx``'s instance on ``private_port`` and prove it through the front
    door; what the phase records (``upstream_before`` is what ``retire`` drains and stops)."""
    proxy = IngressProxy(conn, ctx.host.name, ctx.spec.drain_timeout_s)
    name = ctx.qualified_name
    unproxied = await runtime.stop_unproxied(ctx)  # a host from before the proxy: its instance held the port
    try:
        route = await proxy.ensure_route(name, ctx.spec.port, ctx.release.id, private_port)
    except IngressError:
        await runtime.start_unproxied(ctx, unproxied)  # the proxy did not take the port: what served serves again
        raise
    await failpoint("Before Switch")  # test-only: the new instance runs beside the old one, which still serves
    switched = await proxy.switch(name, ctx.release.id, private_port)
    if route.get("serving_from_start") == ctx.release.id:  # a new frontend, bound serving this release
        switched.before = None
    try:
        seen = await _front_door(proxy, http, ctx)
    except IngressError:
        if switched.before and switched.before != ctx.release.id:
            before = next((s for s in (await proxy.state()).servers.get(name, []) if s.name == switched.before), None)
            if before is not None:
                await proxy.switch(name, before.name, before.port)
        raise
    return {"upstream_before": switched.before, "upstream_after": switched.after, "front_door": seen,
            "switch_seconds": switched.seconds, "private_port": private_port, **({"proxy": route} if route else {}),
            **({"stopped_unproxied": unproxied} if unproxied else {})}


async def retire(conn: Connection, runtime: Runtime, ctx: ReleaseContext, before: str | None) -> dict[str, Any]:
    """After the switch to ``ctx``: the release that served ``before`` drains, then every other instance of the
    service stops (kept for rollback); what the phase records."""
    await failpoint("Switch")  # test-only: crash tests kill the daemon between the switch and the old one's stop
    drained = 0.0
    if before and before != ctx.release.id:
        drained = await IngressProxy(conn, ctx.host.name, ctx.spec.drain_timeout_s).drain(ctx.qualified_name, before)
    return {"drain_seconds": drained, "stopped": await runtime.stop_others(ctx)}


async def _front_door(proxy: IngressProxy, http: httpx.AsyncClient, ctx: ReleaseContext) -> str:
    """The release a request through the public port reaches must be ``ctx``'s (bounded retries)."""
    seen = ""
    t0 = time.monotonic()
    for _ in range(FRONT_DOOR_TRIES):
        seen = await proxy.front_door(http, ctx.spec.port, ctx.spec.health.path)
        if seen == ctx.release.id:
            return seen
        await asyncio.sleep(0.1)
    raise IngressError(ctx.host.name, f"public port {ctx.spec.port} still reaches {seen or 'no release'} "
                                      f"{time.monotonic() - t0:.1f} s after the switch to {ctx.release.id}")

"""Manual drift healed: from a `docker rm -f` by hand to the service answering again, event-driven vs poll-only.

Two real daemons in-process (tests/e2e/daemon_harness: the real loop, OpenSSH, the host's Docker engine, the
Registry), each with its own instance and one small busybox service on the sandbox's first host, in the same
run, rounds interleaved:

- **events**: `heal_on_events: true` (the default); its resync is an hour away, so only the host's event heals;
- **poll-only**: `heal_on_events: false` and the default `resync_interval_s: 60`: what healed drift before.

Poll-only depends on where in the resync period the drift lands: before each of its rounds the bench waits a
seeded random part of the period (uniform), so its figures sample that phase instead of always landing just after
the previous resync. Each round removes the service's container the way a user would (`ssh host docker rm -f
<id>`, its own OpenSSH connection), starting the clock just before, and stops it when an HTTP GET of the service's
port answers with its page again (polled every 50 ms from this machine). Prints each round, the medians and their
ratio. The rounds come faster than a healed service must stay up to be forgotten by the flap guard
(heal.STABLE_S), so the bench clears the guard's record before each events round: without that, the third
removal within two minutes is (rightly) held back 10 s, the fourth 20 s.

Run: `DEPLOYERD_BENCH_SANDBOX=/tmp/bench-sbx BENCH_ROUNDS=5 .venv/bin/python bench/heal_bench.py`
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_sandbox, med, ssh, wait_job  # noqa: E402
from daemon_harness import Daemon, DesiredRepo, containers_of, running_daemon, settings_for  # noqa: E402

from deployerd.sandbox import SandboxInfo  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
RESYNC_S = 60.0  # the default resync_interval_s
PHASES = random.Random(11)  # where in the resync period each poll-only round's drift lands
LIMIT_S = 180.0  # a round that has not healed by then is a failure, not a figure


async def answers(url: str, text: str) -> bool:
    import httpx

    try:
        # a port nothing listens on yet may drop the SYN: a short connect timeout keeps the 50 ms polling honest
        async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=0.25)) as client:
            return text in (await client.get(url)).text
    except httpx.HTTPError:
        return False


async def settled(d: Daemon, service: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        jobs = await d.jobs(service)
        if jobs and jobs[0].status.finished and not d.engine.queue.in_flight:
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{service} was not deployed within {LIMIT_S:g} s")


async def one_round(sandbox: SandboxInfo, d: Daemon, service: str, port: int) -> tuple[float, str]:
    """Seconds from `docker rm -f` of the service's container to its page answering again, and when (after the
    removal began) the job that healed it started, and how long it took."""
    host = sandbox.hosts[0]
    url, text = f"http://{host.internal_address}:{port}/", f"{service} v1"
    deadline = time.monotonic() + LIMIT_S
    while not (await answers(url, text) and not d.engine.queue.in_flight):  # the last round's heal is over
        if time.monotonic() > deadline:
            raise SystemExit(f"{service} does not answer before its round")
        await asyncio.sleep(0.1)
    [c] = [c for c in await containers_of(d, d.engine.desired.hosts[host.name], service) if c["State"] == "running"]
    before = (await d.jobs(service))[0].id
    t0, wall0 = time.monotonic(), time.time()
    await asyncio.to_thread(ssh, host, f"docker rm -f {c['Id']} >/dev/null")
    removed = time.monotonic() - t0
    while not await answers(url, text):
        if time.monotonic() - t0 > LIMIT_S:
            raise SystemExit(f"{service} was not healed within {LIMIT_S:g} s")
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    job = await wait_job(d, service, before, LIMIT_S)
    started = datetime.fromisoformat(job.started_at.replace("Z", "+00:00")).timestamp() - wall0
    return took, (f"(rm -f returned at {removed:.2f} s; {job.trigger} job started at {started:.2f} s, "
                  f"{job.status.value} in {job.duration_seconds or 0:.2f} s)")


async def main() -> None:
    sandbox = bench_sandbox()
    work = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    kinds = {"events": ("hb-events", 8191), "poll-only": ("hb-poll", 8192)}
    repos = {}
    for kind, (service, port) in kinds.items():
        repo = repos[kind] = DesiredRepo(work / kind / "repo", sandbox)
        repo.service(service, port)
        repo.commit("v1")
    events = settings_for(work / "events", sandbox, repos["events"])  # resync an hour away: only events heal
    poll = settings_for(work / "poll-only", sandbox, repos["poll-only"]).model_copy(
        update={"heal_on_events": False, "resync_interval_s": RESYNC_S})
    times: dict[str, list[float]] = {k: [] for k in kinds}
    async with running_daemon(events, loop=True) as de, running_daemon(poll, loop=True) as dp:
        daemons = {"events": de, "poll-only": dp}
        for kind, d in daemons.items():
            await settled(d, kinds[kind][0])
        for r in range(ROUNDS):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))  # who goes first rotates
            for kind in order:
                service, port = kinds[kind]
                if kind == "poll-only":
                    await asyncio.sleep(PHASES.uniform(0, RESYNC_S))
                else:  # rounds come faster than heal.STABLE_S: the flap guard would take them for a crash loop
                    daemons[kind].engine.healer.flaps.clear()
                s, detail = await one_round(sandbox, daemons[kind], service, port)
                times[kind].append(s)
                print(f"round {r + 1} {kind:<9} docker rm -f -> answering again: {s:6.2f} s {detail}", flush=True)
        heals = [j for j in await de.jobs("hb-events") if j.trigger == "heal"]
        resyncs = [j for j in await dp.jobs("hb-poll") if j.trigger == "resync"]
    ev, po = med(times["events"]), med(times["poll-only"])
    print(f"\nmedian of {ROUNDS}: events {ev:.2f} s (max {max(times['events']):.2f}), poll-only {po:.2f} s "
          f"(max {max(times['poll-only']):.2f}, resync_interval_s {RESYNC_S:g}); poll-only / events = {po / ev:.1f}x")
    print(f"jobs: events daemon {len(heals)} with trigger heal, poll-only daemon {len(resyncs)} with trigger resync")


if __name__ == "__main__":
    asyncio.run(main())

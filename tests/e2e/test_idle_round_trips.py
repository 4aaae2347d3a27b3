"""An idle reconcile costs the same round trips per host (SSH commands, SFTP calls, Docker API requests through
the tunnel) whatever the number of services, and the daemon exports those counters on /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_harness import DesiredRepo, running_daemon, settings_for

from deployerd.sandbox import SandboxInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def idle_trips(d) -> dict[str, tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """Round trips per host of one reconcile that must find nothing to do: (commands, sftp, docker API)."""
    pool = d.engine.hosts.pool
    before = pool.stats()
    actions = await d.reconcile()
    assert all(a.kind.value == "noop" for a in actions), [(a.service, a.kind, a.reasons) for a in actions]
    after = pool.stats()
    return {h: (after[h].commands - before[h].commands, after[h].sftp_ops - before[h].sftp_ops,
                after[h].api_requests - before[h].api_requests) for h in after}


async def test_idle_round_trips_do_not_grow_with_services(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("rt-1", 8251)
    repo.commit("one service")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        actions = await d.reconcile()
        assert [a.kind.value for a in actions] == ["deploy"], (actions, d.engine.last_reconcile)
        assert (await d.last_job("rt-1")).status.value == "succeeded"
        one = await idle_trips(d)
        for i in range(2, 5):
            repo.service(f"rt-{i}", 8250 + i)
        repo.commit("four services")
        await d.reconcile()
        four = await idle_trips(d)
        assert four == one, (one, four)
        host = sandbox.hosts[0].name
        assert one[host][2] >= 1, "the Docker runtime's list request is counted"
        text = (await d.http.get("/metrics")).text
        assert f'deployerd_host_operations_total{{host="{host}",kind="docker_api"}}' in text
        health = (await d.http.get("/health")).json()
        assert set(health["last_reconcile"]["stages"]) >= {"fetch", "load", "observe", "plan"}

"""The status read model: sync and health state of each service from one snapshot, as enums."""

from __future__ import annotations

import dataclasses
from typing import cast

from deployerd.desired import DesiredState, HostSpec, ServiceSpec
from deployerd.observed import HostFacts, Instance, ObservedState, RunState
from deployerd.plan import Action, ActionKind
from deployerd.snapshot import Snapshot
from deployerd.status import Board, HealthState, SyncState, paused
from deployerd.tree import GitTree
from deployerd.ui.views import host_rows

HOSTS = {"h1": HostSpec(name="h1", address="2001:db8::1"), "h2": HostSpec(name="h2", address="10.0.0.2")}
SPECS = {n: ServiceSpec(name=n, host=h, port=8000 + i, source=f"services/{n}")
         for i, (n, h) in enumerate([("ok", "h1"), ("drift", "h1"), ("gone", "h1"), ("busy", "h1"),
                                     ("sick", "h1"), ("dark", "h2")])}


def _inst(service: str, state: RunState = RunState.RUNNING, healthy: bool | None = True,
          managed_by: str = "git") -> Instance:
    return Instance(service=service, host="h1", method="docker", release="r1", commit="c" * 40, state=state,
                    healthy=healthy, managed_by=managed_by)


def _snapshot(actions: list[Action]) -> Snapshot:
    observed = ObservedState(hosts={
        "h1": HostFacts(host="h1", reachable=True, instances=[
            _inst("ok"), _inst("drift"), _inst("busy"), _inst("sick", RunState.FAILED),
            _inst("legacy", managed_by="api"),
        ]),
        "h2": HostFacts(host="h2", reachable=False, error="host h2 unreachable: refused"),
    })
    desired = DesiredState(revision="c" * 40, hosts=HOSTS, services=SPECS)
    return Snapshot(desired=desired, observed=observed, tree=cast(GitTree, None), secrets={}, actions=actions)


def test_each_state_from_one_snapshot() -> None:
    noop, deploy = ActionKind.NOOP, ActionKind.DEPLOY
    actions = [Action(service=n, host=SPECS[n].host, kind=k, release="r1")
               for n, k in [("ok", noop), ("drift", deploy), ("gone", deploy), ("busy", deploy), ("sick", noop),
                            ("dark", deploy)]]
    board = Board()
    board.update(_snapshot(actions), busy={"busy"})
    got = {n: (s.sync_status, s.health_status) for n, s in board.services.items()}
    assert got == {
        "ok": (SyncState.SYNCED, HealthState.HEALTHY),
        "drift": (SyncState.OUT_OF_SYNC, HealthState.HEALTHY),
        "gone": (SyncState.OUT_OF_SYNC, HealthState.MISSING),
        "busy": (SyncState.OUT_OF_SYNC, HealthState.PROGRESSING),
        "sick": (SyncState.SYNCED, HealthState.DEGRADED),
        "dark": (SyncState.UNKNOWN, HealthState.UNKNOWN),
        "legacy": (SyncState.UNKNOWN, HealthState.HEALTHY),
    }
    assert board.services["ok"].url == "http://[2001:db8::1]:8000"
    assert board.services["legacy"].managed_by == "api"
    assert {r["service"]: r["sync_status"] for r in board.metric_rows()}["drift"] == "OutOfSync"


def test_a_services_last_job_survives_the_next_update() -> None:
    board = Board()
    snap = _snapshot([Action(service="ok", host="h1", kind=ActionKind.NOOP, release="r1")])
    board.update(snap, busy=())
    board.job_ended("ok", "job-1")
    board.job_ended("not-shown", "job-2")
    board.update(snap, busy=())
    assert board.services["ok"].last_job == "job-1" and "not-shown" not in board.services


def test_healthy_only_while_its_probe_of_the_running_release_passes() -> None:
    from deployerd.liveness import Probe

    snap = _snapshot([Action(service=n, host="h1", kind=ActionKind.NOOP, release="r1") for n in ("ok", "drift")])
    board = Board()
    failed = Probe(release="r1", passed=False, detail="/health: HTTP 404", checked_at="2026-12-01T20:00:00+00:00",
                   checked_ts=1.5)
    older = Probe(release="r0", passed=False, detail="/health: HTTP 500", checked_at="2026-12-01T19:00:00+00:00",
                  checked_ts=1.0)
    board.update(snap, busy=(), probes={"ok": failed, "drift": older})
    ok, drift = board.services["ok"], board.services["drift"]
    assert ok.health_status is HealthState.DEGRADED and ok.health_checked_at == failed.checked_at
    assert "health probe failed at 2026-12-01T20:00:00+00:00: /health: HTTP 404" in ok.reasons
    assert drift.health_status is HealthState.HEALTHY and drift.health_checked_at is None  # another release's probe
    rows = {r["service"]: r for r in board.metric_rows()}
    assert rows["ok"]["health_checked_at"] == "1.500" and rows["drift"]["health_checked_at"] == ""
    board.update(snap, busy=(), probes={"ok": Probe(release="r1", passed=True, detail="/health: HTTP 200",
                                                    checked_at="2026-12-01T20:01:00+00:00", checked_ts=2.0)})
    assert board.services["ok"].health_status is HealthState.HEALTHY


def test_a_fleet_shows_every_host_and_its_worst_state_and_a_paused_rollout_is_on_health() -> None:
    fleet = ServiceSpec(name="web", host="h1", hosts=["h1", "h2", "h3"], fleet=["h1", "h2", "h3"], port=8100,
                        source="services/web")
    hosts = {**HOSTS, "h3": HostSpec(name="h3", address="10.0.0.3")}
    why = "rollout paused: host h2 unreachable since 2026-12-02T01:00:00Z"
    observed = ObservedState(hosts={
        "h1": HostFacts(host="h1", reachable=True, instances=[_inst("web")]),
        "h2": HostFacts(host="h2", reachable=False, error="refused"),
        "h3": HostFacts(host="h3", reachable=True, instances=[
            _inst("web").model_copy(update={"host": "h3", "release": "r0"})]),
    })
    actions = [Action(service="web", host="h3", kind=ActionKind.BLOCKED, release="r1", current_release="r0",
                      reasons=[why]),
               Action(service="web", host="h1", kind=ActionKind.NOOP, release="r1", current_release="r1",
                      reasons=["in sync"]),
               Action(service="web", host="h2", kind=ActionKind.BLOCKED, release="r1", reasons=[why])]
    snap = Snapshot(desired=DesiredState(revision="c" * 40, hosts=hosts, services={"web": fleet}),
                    observed=observed, tree=cast(GitTree, None), secrets={}, actions=actions)
    board = Board()
    board.update(snap, busy=set())
    row = board.services["web"]
    assert [(h["host"], h["running_release"], h["sync_status"]) for h in row.hosts] == [
        ("h1", "r1", SyncState.SYNCED), ("h2", None, SyncState.UNKNOWN), ("h3", "r0", SyncState.OUT_OF_SYNC)]
    assert (row.host, row.sync_status, row.health_status) == ("h1", SyncState.OUT_OF_SYNC, HealthState.UNKNOWN)
    assert row.reasons == [f"h2: {why}", f"h3: {why}"]
    assert paused(board) == [f"service web: {why}"]
    one = Board()
    one.update(_snapshot([Action(service="ok", host="h1", kind=ActionKind.NOOP, release="r1")]), busy=set())
    assert one.services["ok"].hosts == [] and paused(one) == []


def test_the_status_page_has_a_cell_per_fleet_host_with_the_rollouts_progress() -> None:
    board = Board()
    board.update(_snapshot([Action(service="ok", host="h1", kind=ActionKind.NOOP, release="r1")]), busy=set())
    one = board.services["ok"]
    assert host_rows(one) == [(one, None)]
    fleet = dataclasses.replace(one, release="r2", hosts=[
        {"host": h, "release": "r2", "running_release": r, "sync_status": s, "health_status": HealthState.HEALTHY,
         "reasons": [], "url": f"http://{h}:8000"} for h, r, s in (("h1", "r2", SyncState.SYNCED),
                                                                  ("h2", "r1", SyncState.OUT_OF_SYNC))])
    cells = host_rows(fleet)
    assert [(c.host, c.running_release, c.sync_status, c.url, p) for c, p in cells] == [
        ("h1", "r2", SyncState.SYNCED, "http://h1:8000", "1 of 2 hosts on r2"),
        ("h2", "r1", SyncState.OUT_OF_SYNC, "http://h2:8000", "1 of 2 hosts on r2")]

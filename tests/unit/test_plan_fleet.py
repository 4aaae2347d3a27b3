"""Planner table tests for a service on several hosts: one action per host, waves, the pause while a host is down,
going back from a release the fleet rejected, the fleet's one Registry entry, and a host taken off the list."""

from __future__ import annotations

from typing import Any

import pytest

from deployerd.desired import DesiredState, HostSpec, Release, ServiceSpec, expected_registry_entry
from deployerd.observed import HostFacts, Instance, ObservedState, RegistryEntry, RunState
from deployerd.plan import Action, ActionKind, describe, plan

NAMES = ("web-1", "web-2", "web-3", "web-4")
HOSTS = {n: HostSpec(name=n, address=f"10.0.0.{i}") for i, n in enumerate(NAMES, 1)}
SHARED = {"source": "s2", "image": "i1", "env": "e1", "port": "p1", "health": "h1"}
OLD, NEW = "rel0000000r1", "rel0000000r2"
SINCE = "2026-12-02T01:00:00+00:00"


def fleet_spec(hosts: tuple[str, ...] = NAMES, **rollout: Any) -> ServiceSpec:
    return ServiceSpec(name="web", host=hosts[0], hosts=list(hosts), fleet=list(hosts), port=8080,
                       source="services/web", rollout={"canary": 1, "batch": 2, **rollout})


def release(on: str, rid: str = NEW, **inputs: str) -> Release:
    return Release(id=rid, inputs={**SHARED, "host": f"o-{on}", **inputs}, per_host=("host", "ingress"))


def desired(spec: ServiceSpec, **host_inputs: dict[str, str]) -> DesiredState:
    on = {h: release(h, **host_inputs.get(h.replace("-", "_"), {})) for h in spec.fleet}
    return DesiredState(revision="c2", hosts=HOSTS, services={"web": spec}, releases={"web": on[spec.fleet[0]]},
                        host_releases={"web": on})


def inst(host: str, rid: str = NEW, state: RunState = RunState.RUNNING, **inputs: str) -> Instance:
    return Instance(service="web", host=host, method="docker", release=rid, state=state,
                    inputs={**SHARED, "host": f"o-{host}", **({"source": "s1"} if rid == OLD else {}), **inputs})


def entry(spec: ServiceSpec, serving: dict[str, str], rid: str = NEW) -> dict[str, RegistryEntry]:
    exp = expected_registry_entry(spec, HOSTS[spec.host], Release(id=rid, inputs={}),
                                  fleet={h: (HOSTS[h], r) for h, r in serving.items()})
    return {"web": RegistryEntry(id=1, name="web", **exp)}


def observed(*instances: Instance, down: tuple[str, ...] = (), registry: dict[str, RegistryEntry] | None = None,
             kept: dict[str, list[str]] | None = None) -> ObservedState:
    facts = {h: HostFacts(host=h, reachable=False, error=f"host {h}: timeout", down_since=SINCE) if h in down else
             HostFacts(host=h, reachable=True, instances=[i for i in instances if i.host == h],
                       releases_kept={"web": (kept or {}).get(h, [])})
             for h in NAMES}
    return ObservedState(hosts=facts, registry=registry)


def rows(actions: list[Action]) -> list[tuple[str, str, int | None, list[str]]]:
    return [(a.kind.value, a.host, a.wave, a.reasons) for a in actions]


SPEC = fleet_spec()
ALL_OLD = [inst(h, OLD) for h in NAMES]
CHANGED = ["changed: source files"]
PAUSED = [f"rollout paused: host web-3 unreachable since {SINCE}"]


CASES: list[tuple[str, DesiredState, ObservedState, list[tuple[str, str, int | None, list[str]]]]] = [
    ("waves-canary-then-batches", desired(SPEC), observed(*ALL_OLD),
     [("deploy", "web-1", 0, CHANGED), ("deploy", "web-2", 1, CHANGED), ("deploy", "web-3", 1, CHANGED),
      ("deploy", "web-4", 2, CHANGED)]),
    ("no-canary-percent-batches", desired(fleet_spec(canary=0, batch="75%")), observed(*ALL_OLD),
     [("deploy", "web-1", 1, CHANGED), ("deploy", "web-2", 1, CHANGED), ("deploy", "web-3", 1, CHANGED),
      ("deploy", "web-4", 2, CHANGED)]),
    ("added-host-goes-first", desired(SPEC), observed(*[inst(h, OLD) for h in NAMES if h != "web-3"]),
     [("deploy", "web-3", 0, ["not deployed on web-3"]), ("deploy", "web-1", 1, CHANGED),
      ("deploy", "web-2", 1, CHANGED), ("deploy", "web-4", 2, CHANGED)]),
    ("only-the-hosts-that-need-it", desired(SPEC),
     observed(inst("web-1"), inst("web-2", state=RunState.STOPPED), inst("web-3"), inst("web-4"),
              registry=entry(SPEC, dict.fromkeys(NAMES, NEW))),
     [("deploy", "web-2", 0, ["not running (stopped)"]), ("noop", "web-1", None, ["in sync"]),
      ("noop", "web-3", None, ["in sync"]), ("noop", "web-4", None, ["in sync"])]),
    # a host's own inputs are outside the id: they change with the next release (an instance is named by its id)
    ("host-inputs-outside-the-id", desired(SPEC, web_2={"host": "o-moved"}),
     observed(*[inst(h) for h in NAMES], registry=entry(SPEC, dict.fromkeys(NAMES, NEW))),
     [("noop", h, None, ["in sync"]) for h in NAMES]),
    ("paused-while-a-host-is-down", desired(SPEC), observed(*ALL_OLD, down=("web-3",)),
     [("blocked", "web-1", None, PAUSED + CHANGED), ("blocked", "web-2", None, PAUSED + CHANGED),
      ("blocked", "web-3", None, [*PAUSED, "host web-3 unreachable: host web-3: timeout"]),
      ("blocked", "web-4", None, PAUSED + CHANGED)]),
    ("down-host-known-to-run-it-pauses-nothing", desired(SPEC),
     observed(inst("web-1"), inst("web-2", OLD), inst("web-4", OLD), down=("web-3",),
              registry=entry(SPEC, {"web-1": NEW, "web-2": OLD, "web-3": NEW, "web-4": OLD})),
     [("deploy", "web-2", 0, CHANGED), ("deploy", "web-4", 1, CHANGED),
      ("blocked", "web-3", None, ["host web-3 unreachable: host web-3: timeout"]),
      ("noop", "web-1", None, ["in sync"])]),
    ("down-host-with-nothing-to-deploy", desired(SPEC),
     observed(inst("web-1"), inst("web-2"), inst("web-4"), down=("web-3",),
              registry=entry(SPEC, {"web-1": NEW, "web-2": NEW, "web-4": NEW})),
     [("blocked", "web-3", None, ["host web-3 unreachable: host web-3: timeout"]),
      ("noop", "web-1", None, ["in sync"]), ("noop", "web-2", None, ["in sync"]),
      ("noop", "web-4", None, ["in sync"])]),
    ("one-registry-write-for-the-fleet", desired(SPEC), observed(*[inst(h) for h in NAMES], registry={}),
     [("register", "web-1", None, ["registry entry missing"]), ("noop", "web-2", None, ["in sync"]),
      ("noop", "web-3", None, ["in sync"]), ("noop", "web-4", None, ["in sync"])]),
    ("registry-compared-with-each-hosts-release", desired(SPEC),
     observed(*[inst(h) for h in NAMES], registry=entry(SPEC, {**dict.fromkeys(NAMES, NEW), "web-4": OLD})),
     [("register", "web-1", None, ["registry entry wrong: metadata"]), ("noop", "web-2", None, ["in sync"]),
      ("noop", "web-3", None, ["in sync"]), ("noop", "web-4", None, ["in sync"])]),
    ("registry-keeps-what-a-down-host-ran", desired(SPEC),
     observed(inst("web-1"), inst("web-2"), inst("web-4"), down=("web-3",),
              registry=entry(SPEC, dict.fromkeys(NAMES, NEW))),
     [("blocked", "web-3", None, ["host web-3 unreachable: host web-3: timeout"]),
      ("noop", "web-1", None, ["in sync"]), ("noop", "web-2", None, ["in sync"]),
      ("noop", "web-4", None, ["in sync"])]),
    ("host-taken-off-the-list", desired(fleet_spec(("web-1", "web-2"))),
     observed(inst("web-1"), inst("web-2"), inst("web-3"),
              registry=entry(fleet_spec(("web-1", "web-2")), {"web-1": NEW, "web-2": NEW})),
     [("prune", "web-3", None, ["removed from the service's hosts"]), ("noop", "web-1", None, ["in sync"]),
      ("noop", "web-2", None, ["in sync"])]),
    ("host-taken-off-kept-until-another-serves", desired(fleet_spec(("web-1", "web-2"))), observed(inst("web-3")),
     [("deploy", "web-1", 0, ["not deployed on web-1"]), ("deploy", "web-2", 1, ["not deployed on web-2"]),
      ("blocked", "web-3", None, ["removed from the service's hosts; left running until a host of the list "
                                  "serves the service"])]),
    ("one-host-to-hosts-new-hosts-first", desired(fleet_spec(("web-1", "web-2", "web-3"), batch=1)),
     observed(inst("web-2", "rel0000one00")),
     [("deploy", "web-1", 0, ["not deployed on web-1"]), ("deploy", "web-3", 1, ["not deployed on web-3"]),
      ("deploy", "web-2", 2, ["changed: release rel0000one00"])]),
]


@pytest.mark.parametrize(("want", "have", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fleet_plan_table(want: DesiredState, have: ObservedState,
                          expected: list[tuple[str, str, int | None, list[str]]]) -> None:
    assert rows(plan(want, have)) == expected


def test_every_host_gets_the_fleets_one_release_with_its_own_inputs() -> None:
    actions = plan(desired(SPEC), observed(*ALL_OLD))
    assert {a.release for a in actions} == {NEW} and {a.current_release for a in actions} == {OLD}


def test_release_rejected_by_the_fleet_goes_back_to_the_last_good() -> None:
    """A fleet rollback cut short (the daemon stopped): hosts still on the rejected release go back to the last good
    one (kept there: no rebuild); the others stay on it, blocked as quarantined."""
    have = observed(inst("web-1"), inst("web-2"), inst("web-3", OLD), inst("web-4", OLD),
                    kept={"web-1": [OLD], "web-2": []})
    actions = plan(desired(SPEC), have, quarantined={"web": NEW}, last_good={"web": OLD})
    rejected = f"release {NEW} rejected by the fleet (quarantined): back to last good {OLD}"
    quarantined = f"release {NEW} quarantined after a failed deploy; waiting for git to change"
    assert rows(actions) == [("restore", "web-1", 0, [rejected]), ("restore", "web-2", 1, [rejected]),
                             ("blocked", "web-3", None, [quarantined]), ("blocked", "web-4", None, [quarantined])]
    assert [(a.release, a.current_release, a.kept) for a in actions[:2]] == [(OLD, NEW, True), (OLD, NEW, False)]
    # with no last good release known, nothing is touched
    [first, *_] = plan(desired(SPEC), have, quarantined={"web": NEW})
    assert first.kind is ActionKind.BLOCKED and "no last good release" in first.reasons[0]
    # sync --force retries the release instead
    forced = plan(desired(SPEC), have, quarantined={"web": NEW}, last_good={"web": OLD}, force=True)
    assert {(a.host, a.kind) for a in forced if a.kind is not ActionKind.NOOP} == {
        ("web-3", ActionKind.DEPLOY), ("web-4", ActionKind.DEPLOY)}


def test_resumes_when_the_host_is_back() -> None:
    paused = plan(desired(SPEC), observed(*ALL_OLD, down=("web-3",)))
    assert {a.kind for a in paused} == {ActionKind.BLOCKED} and all(a.wave is None for a in paused)
    resumed = plan(desired(SPEC), observed(*ALL_OLD))
    assert {a.kind for a in resumed} == {ActionKind.DEPLOY}


def test_one_host_services_have_no_wave() -> None:
    one = ServiceSpec(name="api", host="web-1", port=8081, source="services/api")
    want = DesiredState(revision="c", hosts=HOSTS, services={"api": one},
                        releases={"api": Release(id=NEW, inputs={})})
    [action] = plan(want, observed())
    assert action.kind is ActionKind.DEPLOY and action.wave is None


def test_describe_names_each_hosts_wave() -> None:
    text = describe(plan(desired(SPEC), observed(*ALL_OLD)))
    lines = text.splitlines()
    assert lines[0].startswith("DEPLOY   web@web-1 [canary]") and f"{OLD} -> {NEW}" in lines[0]
    assert "web@web-2 [wave 1]" in lines[1] and "web@web-4 [wave 2]" in lines[3]
    assert all("changed: source files" in line for line in lines)

"""Planner table tests: a desired state, observed facts, the exact actions and reasons expected."""

from __future__ import annotations

from typing import Any

import pytest

from deployerd.desired import (
    DesiredState,
    HostSpec,
    ManifestError,
    Release,
    ServiceSpec,
    expected_registry_entry,
)
from deployerd.observed import HostFacts, Instance, ObservedState, RegistryEntry, RunState
from deployerd.plan import Action, ActionKind, describe, plan, plan_out_of_band

INPUTS = {"source": "s1", "image": "i1", "env": "e1", "port": "p1", "health": "h1", "host": "o1"}
R1 = Release(id="rel000000001", inputs=INPUTS)
HOSTS = {"prod-1": HostSpec(name="prod-1", address="10.0.0.1"),
         "prod-2": HostSpec(name="prod-2", address="10.0.0.2", public_address="web2.example.com")}


GUARD = ("commit removes every service; prune refused (empty desired state guard: "
         "`deployerd sync --prune-all` prunes them)")


def spec(name: str = "web", host: str = "prod-1", port: int = 8080, **kw: Any) -> ServiceSpec:
    return ServiceSpec(name=name, host=host, port=port, source=f"services/{name}", **kw)


def desired(*specs: ServiceSpec, releases: dict[str, Release] | None = None, broken: set[str] = frozenset(),
            errors: list[ManifestError] | None = None, complete: bool = True) -> DesiredState:
    releases = releases or {s.name: R1 for s in specs}
    return DesiredState(revision="c1", hosts=HOSTS, services={s.name: s for s in specs}, releases=releases,
                        errors=errors or [], broken=set(broken), complete=complete)


def inst(service: str = "web", host: str = "prod-1", release: str = R1.id, state: RunState = RunState.RUNNING,
         inputs: dict[str, str] | None = None, **kw: Any) -> Instance:
    return Instance(service=service, host=host, method="docker", release=release, state=state,
                    inputs=INPUTS if inputs is None else inputs, **kw)


def registry_for(*specs: ServiceSpec, release: Release = R1, **override: Any) -> dict[str, RegistryEntry]:
    out = {}
    for i, s in enumerate(specs, 1):
        exp = expected_registry_entry(s, HOSTS[s.host], release)
        out[s.name] = RegistryEntry(id=s.droplet_id or i, name=s.name, **{**exp, **override})
    return out


def observed(*instances: Instance, registry: dict[str, RegistryEntry] | None = None,
             unreachable: dict[str, str] | None = None, kept: dict[str, dict[str, list[str]]] | None = None,
             hosts: tuple[str, ...] = ("prod-1", "prod-2")) -> ObservedState:
    facts = {}
    for h in hosts:
        if h in (unreachable or {}):
            facts[h] = HostFacts(host=h, reachable=False, error=(unreachable or {})[h])
        else:
            facts[h] = HostFacts(host=h, reachable=True, instances=[i for i in instances if i.host == h],
                                 releases_kept=(kept or {}).get(h, {}))
    return ObservedState(hosts=facts, registry=registry)


def summary(actions: list[Action]) -> list[tuple[str, str, str, list[str]]]:
    return [(a.kind.value, a.service, a.host, a.reasons) for a in actions]


WEB = spec()


# --------------------------------------------------------------------------- table


CASES: list[tuple[str, DesiredState, ObservedState, list[tuple[str, str, str, list[str]]]]] = [
    ("in-sync", desired(WEB), observed(inst(), registry=registry_for(WEB)),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("missing", desired(WEB), observed(registry=registry_for(WEB)),
     [("deploy", "web", "prod-1", ["not deployed on prod-1"])]),
    ("missing-and-unregistered", desired(WEB), observed(registry={}),
     [("deploy", "web", "prod-1", ["not deployed on prod-1", "registry entry missing"])]),
    ("changed-source-env", desired(WEB, releases={"web": Release(id="rel000000002", inputs={
        **INPUTS, "source": "s2", "env": "e2"})}),
     observed(inst(), registry=registry_for(WEB)),
     [("deploy", "web", "prod-1", ["changed: source files, env"])]),
    ("changed-no-inputs-recorded", desired(WEB, releases={"web": Release(id="rel000000002", inputs=INPUTS)}),
     observed(inst(inputs={})), [("deploy", "web", "prod-1", ["changed: release rel000000001"])]),
    ("stopped", desired(WEB), observed(inst(state=RunState.STOPPED)),
     [("deploy", "web", "prod-1", ["not running (stopped)"])]),
    ("failed", desired(WEB), observed(inst(state=RunState.FAILED)),
     [("deploy", "web", "prod-1", ["not running (failed)"])]),
    ("unhealthy", desired(WEB), observed(inst(healthy=False)),
     [("deploy", "web", "prod-1", ["unhealthy"])]),
    ("health-unknown-is-fine", desired(WEB), observed(inst(healthy=None)),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("registry-missing", desired(WEB), observed(inst(), registry={}),
     [("register", "web", "prod-1", ["registry entry missing"])]),
    ("registry-wrong-endpoint", desired(WEB), observed(inst(), registry=registry_for(WEB, endpoint="http://x:1")),
     [("register", "web", "prod-1", ["registry entry wrong: endpoint"])]),
    ("registry-wrong-status-metadata", desired(WEB),
     observed(inst(), registry=registry_for(WEB, status="inactive", metadata={"managed_by": "deployerd"})),
     [("register", "web", "prod-1", ["registry entry wrong: status, metadata"])]),
    ("registry-wrong-id", desired(spec(droplet_id=5)), observed(inst(), registry={
        "web": RegistryEntry(id=9, name="web", **expected_registry_entry(spec(), HOSTS["prod-1"], R1))}),
     [("register", "web", "prod-1", ["registry entry wrong: id"])]),
    ("registry-unreadable-skipped", desired(WEB), observed(inst(), registry=None),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("register-false", desired(spec(register=False)), observed(inst(), registry={}),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("registry-folded-into-deploy", desired(WEB), observed(inst(healthy=False),
                                                             registry=registry_for(WEB, endpoint="http://x:1")),
     [("deploy", "web", "prod-1", ["unhealthy"])]),
    ("host-moved", desired(spec(host="prod-2")), observed(inst(host="prod-1")),
     [("prune", "web", "prod-1", ["moved to prod-2"]),
      ("deploy", "web", "prod-2", ["not deployed on prod-2 (moving from prod-1)"])]),
    ("host-moved-new-unreachable", desired(spec(host="prod-2")),
     observed(inst(host="prod-1"), unreachable={"prod-2": "connection refused"}),
     [("blocked", "web", "prod-2", ["host prod-2 unreachable: connection refused"])]),
    ("removed-from-git", desired(WEB), observed(inst(), inst("old", port=9000), registry={
        **registry_for(WEB), "old": RegistryEntry(id=7, name="old", endpoint="http://10.0.0.1:9000", status="active",
                                                  metadata={"managed_by": "deployerd", "host": "prod-1"})}),
     [("prune", "old", "prod-1", ["removed from git"]), ("noop", "web", "prod-1", ["in sync"])]),
    ("removed-registry-only", desired(WEB), observed(inst(), registry={
        **registry_for(WEB), "gone": RegistryEntry(id=7, name="gone", endpoint="http://x:1", status="active",
                                                   metadata={"managed_by": "deployerd", "host": "prod-2"})}),
     [("prune", "gone", "prod-2", ["removed from git (registry entry only)"]), ("noop", "web", "prod-1", ["in sync"])]),
    ("foreign-registry-entry-left", desired(WEB), observed(inst(), registry={
        **registry_for(WEB), "theirs": RegistryEntry(id=7, name="theirs", endpoint="http://x:1", status="active")}),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("out-of-band-never-pruned", desired(WEB), observed(inst(), inst("adhoc", managed_by="api", release="x")),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("out-of-band-same-name-untouched", desired(WEB), observed(inst(managed_by="api", release="x")),
     [("blocked", "web", "prod-1", ["an out-of-band instance of web runs on prod-1; left untouched"])]),
    ("unreachable", desired(WEB), observed(unreachable={"prod-1": "host prod-1: timeout"}),
     [("blocked", "web", "prod-1", ["host prod-1 unreachable: host prod-1: timeout"])]),
    ("not-observed", desired(WEB), observed(hosts=("prod-2",)),
     [("blocked", "web", "prod-1", ["host prod-1 unreachable: not observed"])]),
    ("no-prune-on-unreachable", desired(WEB), observed(inst(), unreachable={"prod-2": "down"}),
     [("noop", "web", "prod-1", ["in sync"])]),
    ("empty-guard", desired(), observed(inst(), inst("api", port=8081)),
     [("blocked", "api", "prod-1", [GUARD]), ("blocked", "web", "prod-1", [GUARD])]),
    ("empty-nothing-observed", desired(), observed(), []),
    ("broken-manifest", desired(broken={"web"}, errors=[
        ManifestError(file="services/web.yaml", field="port", reason="must be between 1 and 65535")]),
     observed(inst()),
     [("blocked", "web", "prod-1",
       ["manifest invalid: services/web.yaml: port: must be between 1 and 65535; running release left as is"])]),
    ("broken-hosts-no-prune", desired(broken={"web"}, complete=False, errors=[
        ManifestError(file="hosts.yaml", reason="file not found")]),
     observed(inst(), inst("old")),
     [("blocked", "old", "prod-1", ["hosts.yaml invalid; prune refused until the desired state is whole"]),
      ("blocked", "web", "prod-1", ["manifest invalid: hosts.yaml: file not found; running release left as is"])]),
    ("sort-order", desired(WEB, spec("api", port=8081), spec("zed", port=8082, host="prod-2")),
     observed(inst("api", port=8081), inst("old"), registry={"api": registry_for(spec("api", port=8081))["api"]},
              unreachable={"prod-2": "down"}),
     [("prune", "old", "prod-1", ["removed from git"]),
      ("deploy", "web", "prod-1", ["not deployed on prod-1", "registry entry missing"]),
      ("blocked", "zed", "prod-2", ["host prod-2 unreachable: down"]),
      ("noop", "api", "prod-1", ["in sync"])]),
]


@pytest.mark.parametrize(("want", "have", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(want: DesiredState, have: ObservedState, expected: list[tuple[str, str, str, list[str]]]) -> None:
    assert summary(plan(want, have)) == expected


# --------------------------------------------------------------------------- quarantine, kept, fields


def test_quarantined_release_blocked_until_git_changes_or_force() -> None:
    want, have = desired(WEB), observed(inst(release="rel000000000"))
    blocked = plan(want, have, quarantined={"web": R1.id})
    assert summary(blocked) == [("blocked", "web", "prod-1", [
        "release rel000000001 quarantined after a failed deploy; waiting for git to change"])]
    assert [a.kind for a in plan(want, have, quarantined={"web": "rel999999999"})] == [ActionKind.DEPLOY]
    assert [a.kind for a in plan(want, have, quarantined={"web": R1.id}, force=True)] == [ActionKind.DEPLOY]


def test_prune_all_lets_an_emptying_commit_prune() -> None:
    """The guard's explicit way through: asked for (sync --prune-all), every service git left is pruned, and
    its Registry entry with it; out-of-band instances stay."""
    have = observed(inst(), inst("api", port=8081), inst("adhoc", managed_by="api"),
                    registry=registry_for(WEB, metadata={"managed_by": "deployerd", "host": "prod-1"}))
    assert summary(plan(desired(), have, prune_all=True)) == [
        ("prune", "api", "prod-1", ["removed from git"]), ("prune", "web", "prod-1", ["removed from git"])]
    assert {a.kind for a in plan(desired(), have)} == {ActionKind.BLOCKED}  # not asked: the guard holds


def test_quarantine_does_not_block_in_sync_service() -> None:
    assert [a.kind for a in plan(desired(WEB), observed(inst()), quarantined={"web": R1.id})] == [ActionKind.NOOP]


def test_kept_release_restored_without_rebuild() -> None:
    have = observed(inst(release="rel000000000", inputs={**INPUTS, "env": "e0"}), kept={"prod-1": {"web": [R1.id]}})
    [action] = plan(desired(WEB), have)
    assert action.kind is ActionKind.DEPLOY and action.kept
    assert action.reasons == ["changed: env", "kept release, no rebuild"]
    assert (action.release, action.current_release) == (R1.id, "rel000000000")


def test_not_kept_when_other_release_kept() -> None:
    have = observed(inst(release="rel000000000"), kept={"prod-1": {"web": ["rel000000000"]}})
    [action] = plan(desired(WEB), have)
    assert action.kind is ActionKind.DEPLOY and not action.kept


def test_running_instance_preferred_over_stopped_rollback_copy() -> None:
    have = observed(inst(release="rel000000000", state=RunState.STOPPED, current=False), inst())
    assert summary(plan(desired(WEB), have)) == [("noop", "web", "prod-1", ["in sync"])]


def test_plan_is_deterministic_and_pure() -> None:
    want = desired(WEB, spec("api", port=8081))
    have = observed(inst("old"), inst("api", port=8081, state=RunState.FAILED), registry={})
    before = (want.model_dump(), have.model_dump())
    first, second = plan(want, have), plan(want, have)
    assert first == second
    assert (want.model_dump(), have.model_dump()) == before


def test_describe() -> None:
    want, have = desired(WEB), observed(inst(release="rel000000000", inputs={**INPUTS, "port": "p0"}))
    text = describe(plan(want, have))
    assert text.startswith("DEPLOY")
    assert "web@prod-1" in text and "rel000000000 -> rel000000001" in text and "changed: port" in text
    assert describe([]) == "nothing to do"


def test_registry_entries_of_another_instance_are_neither_pruned_nor_owned() -> None:
    """Two daemons sharing a Registry (staging and prod, say) never prune each other's entries."""
    web = spec("web")
    theirs = RegistryEntry(id=7, name="other", endpoint="http://x:1", status="active",
                           metadata={"managed_by": "deployerd", "instance": "prod", "host": "prod-1"})
    mine = RegistryEntry(id=8, name="gone", endpoint="http://x:2", status="active",
                         metadata={"managed_by": "deployerd", "instance": "staging", "host": "prod-1"})
    seen = observed(inst("web"), registry={"other": theirs, "gone": mine})
    actions = plan(desired(web), seen, instance="staging")
    assert [(a.service, a.kind) for a in actions if a.kind is ActionKind.PRUNE] == [("gone", ActionKind.PRUNE)]
    assert all(a.service != "other" for a in actions)


def test_quarantined_release_with_its_last_good_stopped_restores_the_last_good() -> None:
    web = spec("web")
    bad = Release(id="rel000000bad", inputs={**INPUTS, "source": "s2"})
    stopped = inst("web", state=RunState.STOPPED)  # R1, the last good release, stopped by hand
    actions = plan(desired(web, releases={"web": bad}), observed(stopped), quarantined={"web": bad.id})
    assert [(a.kind, a.release) for a in actions] == [(ActionKind.RESTORE, R1.id)]
    assert "quarantined" in actions[0].reasons[0] and "not running" in actions[0].reasons[1]
    running = inst("web")
    actions = plan(desired(web, releases={"web": bad}), observed(running), quarantined={"web": bad.id})
    assert [a.kind for a in actions] == [ActionKind.BLOCKED]


def test_release_whose_deploy_was_interrupted_is_deployed_again_though_it_runs() -> None:
    """A crash after Start left the new release running, never verified, registered nor retained."""
    in_sync = observed(inst(), registry=registry_for(WEB))
    [again] = plan(desired(WEB), in_sync, interrupted={"web": R1.id})
    assert again.kind is ActionKind.DEPLOY and (again.release, again.current_release) == (R1.id, R1.id)
    assert again.reasons == ["its deploy was interrupted (daemon stopped): verify, register and retain it again"]
    # registry stale too: one deploy does both (its Register phase)
    [again] = plan(desired(WEB), observed(inst(), registry={}), interrupted={"web": R1.id})
    assert again.kind is ActionKind.DEPLOY
    # an interrupted deploy of another release (git moved on, or the old one still runs) changes nothing here
    assert [a.kind for a in plan(desired(WEB), in_sync, interrupted={"web": "rel000000000"})] == [ActionKind.NOOP]
    old = observed(inst(release="rel000000000"), registry=registry_for(WEB))
    [deploy] = plan(desired(WEB), old, interrupted={"web": R1.id})
    assert deploy.kind is ActionKind.DEPLOY and deploy.reasons == ["changed: release rel000000000"]


# --------------------------------------------------------------------------- out-of-band services (POST /deploy)

OOB = spec("adhoc", port=8090)


def oob_registry(**override: Any) -> dict[str, RegistryEntry]:
    exp = expected_registry_entry(OOB, HOSTS["prod-1"], R1, managed_by="api")
    return {"adhoc": RegistryEntry(id=7, name="adhoc", **{**exp, **override})}


@pytest.mark.parametrize(("have", "expected"), [
    (observed(inst("adhoc", port=8090, managed_by="api"), registry=oob_registry()),
     [("noop", "adhoc", "prod-1", ["in sync"])]),
    (observed(inst("adhoc", port=8090, managed_by="api", state=RunState.STOPPED), registry=oob_registry(),
              kept={"prod-1": {"adhoc": [R1.id]}}),
     [("deploy", "adhoc", "prod-1", ["not running (stopped)", "kept release, no rebuild"])]),
    (observed(inst("adhoc", port=8090, managed_by="api"), registry={}),
     [("register", "adhoc", "prod-1", ["registry entry missing"])]),
    (observed(inst("adhoc", port=8090, managed_by="api"), registry=oob_registry(endpoint="http://x:1")),
     [("register", "adhoc", "prod-1", ["registry entry wrong: endpoint"])]),
    (observed(inst("adhoc", port=8090, managed_by="git"), registry=oob_registry()),
     [("blocked", "adhoc", "prod-1", ["a git-managed instance of adhoc runs on prod-1; left untouched"])]),
    (observed(registry=oob_registry(), unreachable={"prod-1": "down"}),
     [("blocked", "adhoc", "prod-1", ["host prod-1 unreachable: down"])]),
], ids=["in-sync", "stopped-by-hand", "registry-lost", "registry-wrong", "git-instance-untouched", "host-down"])
def test_out_of_band_services_are_healed_and_registered_like_git_ones(
        have: ObservedState, expected: list[tuple[str, str, str, list[str]]]) -> None:
    assert summary(plan_out_of_band({"adhoc": (OOB, R1)}, desired(WEB), have)) == expected


def test_out_of_band_left_to_git_when_git_names_it_and_blocked_when_host_left() -> None:
    have = observed(inst("adhoc", port=8090, managed_by="api"))
    assert plan_out_of_band({"adhoc": (OOB, R1)}, desired(spec("adhoc", port=8090)), have) == []
    gone = spec("adhoc", host="prod-9", port=8090)
    assert summary(plan_out_of_band({"adhoc": (gone, R1)}, desired(WEB), have)) == [
        ("blocked", "adhoc", "prod-9", ["host prod-9 is no longer in hosts.yaml; out-of-band release left as is"])]
    # and git's own plan never prunes it, even when a commit removes every git service
    assert plan(desired(), have, prune_all=True) == []


# --------------------------------------------------------------------------- per-runtime facts (issue 12, bug 1)


def _silent_docker(*instances: Instance, registry: dict[str, RegistryEntry] | None = None) -> ObservedState:
    """prod-1 answers over SSH and its systemd answers, its Docker engine does not."""
    facts = {"prod-1": HostFacts(host="prod-1", reachable=True, instances=list(instances),
                                 silent={"docker": "host prod-1: docker not answering: ClientConnectorError"}),
             "prod-2": HostFacts(host="prod-2", reachable=True)}
    return ObservedState(hosts=facts, registry=registry)


def test_silent_docker_makes_only_its_services_unknown() -> None:
    web, unit = spec("web"), spec("unit", port=8081, method="systemd")
    actions = plan(desired(web, unit), _silent_docker(registry={}))
    assert summary(actions) == [
        ("deploy", "unit", "prod-1", ["not deployed on prod-1", "registry entry missing"]),
        ("blocked", "web", "prod-1", ["host prod-1: docker not answering: ClientConnectorError"]),
    ]


def test_silent_docker_prunes_nothing_it_may_hold() -> None:
    """A service removed from git whose Registry entry says docker on prod-1: its container may still run."""
    unit, gone = spec("unit", port=8081, method="systemd"), spec("gone", port=8090)
    running = inst("unit", release=R1.id).model_copy(update={"method": "systemd"})
    actions = plan(desired(unit), _silent_docker(running, registry=registry_for(unit, gone)))
    assert summary(actions) == [
        ("blocked", "gone", "prod-1", ["host prod-1: docker not answering: ClientConnectorError"]),
        ("noop", "unit", "prod-1", ["in sync"]),
    ]


def test_unobserved_docker_neither_deploys_nor_prunes() -> None:
    """A runtime not asked (no service of it placed there) is as unknown as a silent one."""
    facts = {"prod-1": HostFacts(host="prod-1", reachable=True, unobserved=["docker"]),
             "prod-2": HostFacts(host="prod-2", reachable=True)}
    gone = spec("gone", port=8090)
    actions = plan(desired(WEB), ObservedState(hosts=facts, registry=registry_for(WEB, gone)))
    not_observed = "host prod-1: docker not observed (no docker service placed on it)"
    assert summary(actions) == [("blocked", "gone", "prod-1", [not_observed]),
                                ("blocked", "web", "prod-1", [not_observed])]


def test_systemd_only_host_deploys_without_docker() -> None:
    unit = spec("unit", port=8081, method="systemd")
    facts = {"prod-1": HostFacts(host="prod-1", reachable=True, unobserved=["docker"]),
             "prod-2": HostFacts(host="prod-2", reachable=True)}
    actions = plan(desired(unit), ObservedState(hosts=facts, registry={}))
    assert summary(actions) == [("deploy", "unit", "prod-1", ["not deployed on prod-1", "registry entry missing"])]

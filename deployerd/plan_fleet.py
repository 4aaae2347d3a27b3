"""The planner for a service on several hosts (a fleet): one action per host, the changes in waves, paused
while a host that needs the release cannot be reached.

Pure. The rules per host are ``plan_host``'s; here: a pause turns every DEPLOY of the service into BLOCKED
(nothing fails, nothing rolls back; the next plan resumes), DEPLOYs and RESTOREs get their wave
(``waves.py``), the one Registry entry of the service is checked once against what each host runs, and a host
taken off the list is pruned once another host serves.
"""

from __future__ import annotations

from collections.abc import Mapping

from deployerd import waves
from deployerd.desired import DesiredState, HostSpec, Release, ServiceSpec, expected_registry_entry
from deployerd.observed import ObservedState, RunState
from deployerd.plan_host import Action, ActionKind, current_managed, current_release, plan_host, unreachable


def plan_fleet(spec: ServiceSpec, desired: DesiredState, observed: ObservedState, managed_on: set[str],
               quarantined: str | None, force: bool, instance: str, interrupted: str | None,
               last_good: str | None) -> list[Action]:
    """A service on several hosts: one action per host, the changes in waves, paused while a host that needs the
    release cannot be reached; one Registry check for the service; a PRUNE on each host taken off its list."""
    release = desired.releases[spec.name]
    recorded = _recorded_hosts(observed, spec.name, instance)
    actions = {h: plan_host(spec, h, desired.release_on(spec.name, h), observed, quarantined, force, interrupted,
                            "git", [], lambda: None, last_good) for h in spec.fleet}
    down = {h: why for h in spec.fleet if (why := unreachable(observed, h, [spec.method])) is not None
            and recorded.get(h) != release.id}  # unknown, and not known (from the Registry) to run it already
    if down and any(a.kind is ActionKind.DEPLOY for a in actions.values()):
        paused = [f"rollout paused: host {h} unreachable" + (f" since {since}" if (since := _down_since(observed, h))
                                                             else "") for h in down]
        for h, a in actions.items():
            if a.kind is ActionKind.DEPLOY or h in down:
                actions[h] = a.model_copy(update={"kind": ActionKind.BLOCKED, "reasons": [*paused, *a.reasons]})
    changing = [h for h, a in actions.items() if a.kind in (ActionKind.DEPLOY, ActionKind.RESTORE)]
    fresh = {h for h in changing if actions[h].current_release is None}
    for h, wave in waves.wave_of(changing, spec.rollout.canary, spec.rollout.batch, len(spec.fleet), fresh).items():
        actions[h] = actions[h].model_copy(update={"wave": wave})
    if not changing and (reg := _fleet_registry_problem(spec, desired, observed, release, instance, recorded)):
        first = next((h for h, a in actions.items() if a.kind is ActionKind.NOOP), None)
        if first is not None:  # one write for the service (its entry lists every host)
            actions[first] = actions[first].model_copy(update={"kind": ActionKind.REGISTER, "reasons": [reg]})
    out = list(actions.values())
    serves = bool(serving(observed, spec))
    for old in sorted(managed_on - set(spec.fleet)):
        current = current_release(observed, old, spec.name)
        if serves:  # the engine holds a PRUNE back while the service has a DEPLOY: the others serve first
            out.append(Action(service=spec.name, host=old, kind=ActionKind.PRUNE, current_release=current,
                              reasons=["removed from the service's hosts"]))
        else:
            out.append(Action(service=spec.name, host=old, kind=ActionKind.BLOCKED, current_release=current,
                              reasons=["removed from the service's hosts; left running until a host of the list "
                                       "serves the service"]))
    return out


def serving(observed: ObservedState, spec: ServiceSpec) -> dict[str, str]:
    """host -> the release of ``spec`` observed running there (git's own), for each host it is placed on."""
    out = {}
    for host in spec.placed_on:
        if unreachable(observed, host, [spec.method]) is None:
            inst = current_managed(observed.hosts[host], spec.name)
            if inst is not None and inst.state is RunState.RUNNING:
                out[host] = inst.release
    return out


def _down_since(observed: ObservedState, host: str) -> str | None:
    facts = observed.hosts.get(host)
    return facts.down_since if facts is not None else None


def _recorded_hosts(observed: ObservedState, service: str, instance: str) -> dict[str, str]:
    """host -> release, as this daemon's Registry entry of a fleet lists them (what a host it cannot reach ran)."""
    if not observed.owns_entry(service, instance):
        return {}
    meta = (observed.registry[service].metadata or {}) if observed.registry else {}
    listed = meta.get("hosts")
    return {str(h["host"]): str(h.get("release", "")) for h in listed if isinstance(h, dict) and "host" in h} \
        if isinstance(listed, list) else {}


def _fleet_registry_problem(spec: ServiceSpec, desired: DesiredState, observed: ObservedState, release: Release,
                            instance: str, recorded: Mapping[str, str]) -> str | None:
    """Why a fleet's one Registry entry needs writing: compared with the release each host runs (a host that
    could not be read: what the entry says it ran)."""
    if not spec.register or observed.registry is None:
        return None
    entry = observed.registry.get(spec.name)
    if entry is None:
        return "registry entry missing"
    serving: dict[str, tuple[HostSpec, str]] = {}
    for h in spec.fleet:
        known = unreachable(observed, h, [spec.method]) is None
        current = current_release(observed, h, spec.name) if known else recorded.get(h)
        if current:
            serving[h] = (desired.hosts[h], current)
    expected = expected_registry_entry(spec, desired.hosts[spec.host], release, instance, fleet=serving)
    wrong = [f for f in ("endpoint", "status", "metadata") if getattr(entry, f) != expected[f]]
    if spec.droplet_id is not None and entry.id != spec.droplet_id:
        wrong.append("id")
    return f"registry entry wrong: {', '.join(wrong)}" if wrong else None

"""The planner: desired state + observed state -> ordered actions, each with the reasons it exists.

Pure (no asyncio, no I/O) so every decision is a table test. Safety rules it enforces, whatever the
executor does: nothing is deployed or pruned on a host, or in a runtime of a host (its Docker engine
stopped, or not asked), that could not be observed; a broken manifest
leaves its running release alone; an out-of-band (``managed_by == "api"``) instance is never touched;
a commit that removes every service prunes nothing; a quarantined release is not retried until git
changes (or ``force``). The rules for one host are ``plan_host.py``'s; a service on several hosts is planned by
``plan_fleet.py`` (waves, a pause while a host is down).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import get_args

from deployerd import waves
from deployerd.desired import DesiredState, Release, ServiceSpec, expected_registry_entry
from deployerd.observed import Instance, ObservedState
from deployerd.plan_fleet import plan_fleet
from deployerd.plan_host import (
    INPUT_LABELS,
    Action,
    ActionKind,
    current_managed,
    current_release,
    plan_host,
    sort_key,
    unreachable,
)

__all__ = ["INPUT_LABELS", "Action", "ActionKind", "describe", "plan", "plan_out_of_band", "sort_key"]

_RUNTIMES: tuple[str, ...] = get_args(ServiceSpec.model_fields["method"].annotation)  # every deployment method


def plan(
    desired: DesiredState,
    observed: ObservedState,
    quarantined: Mapping[str, str] | None = None,
    force: bool = False,
    instance: str = "default",
    interrupted: Mapping[str, str] | None = None,
    prune_all: bool = False,
    last_good: Mapping[str, str] | None = None,
) -> list[Action]:
    """Every action needed to bring ``observed`` to ``desired``, sorted by `sort_key`.

    ``instance`` is the daemon's name: only Registry entries it owns are compared or pruned.
    ``interrupted`` maps a service to the release its last deploy was deploying when the daemon stopped:
    that release is deployed again even when it already runs, as it may never have been verified healthy,
    registered or retained (or may name the new release while the old code still serves).
    ``prune_all`` lets a commit that removes every service prune them (the empty desired state guard refuses it
    otherwise: an emptied checkout looks just like that); asked for one reconcile by ``sync --prune-all``.
    ``last_good`` maps a service to its last good release: where a fleet's hosts go back to from a release the
    fleet rejected (quarantined) that some of them still serve.
    """
    quarantined = quarantined or {}
    last_good = last_good or {}
    interrupted = interrupted or {}
    managed = _managed_instances(observed)
    registry_owned = _registry_owned(observed, instance)

    if not desired.services and not desired.broken and desired.complete and (managed or registry_owned) \
            and not prune_all:
        names = sorted({i.service for i in managed} | set(registry_owned))
        return sorted((_empty_guard(name, managed, registry_owned) for name in names), key=sort_key)

    # service -> hosts a managed instance of it is on (one pass, not one per service)
    hosts_of: dict[str, set[str]] = {}
    for i in managed:
        hosts_of.setdefault(i.service, set()).add(i.host)
    actions: list[Action] = []
    for name, spec in desired.services.items():
        if spec.fleet:
            actions.extend(plan_fleet(spec, desired, observed, hosts_of.get(name, set()), quarantined.get(name),
                                       force, instance, interrupted.get(name), last_good.get(name)))
            continue
        actions.extend(_plan_service(spec, desired.releases[name], desired, observed, hosts_of.get(name, set()),
                                     quarantined.get(name), force, instance, interrupted.get(name)))
    for name in sorted(desired.broken):
        actions.extend(_plan_broken(name, desired, observed))
    actions.extend(_plan_removed(desired, observed, managed, registry_owned))
    return sorted(actions, key=sort_key)


# --------------------------------------------------------------------------- helpers


def _managed_instances(observed: ObservedState) -> list[Instance]:
    """git-managed instances on reachable hosts (an unreachable host's facts are not trusted)."""
    return [i for facts in observed.hosts.values() if facts.reachable
            for i in facts.instances if i.managed_by == "git"]


def _registry_owned(observed: ObservedState, instance: str) -> dict[str, str]:
    """Registry entries this deployerd instance created: name -> the host recorded in their metadata."""
    if observed.registry is None:
        return {}
    return {name: str((e.metadata or {}).get("host", "")) for name, e in observed.registry.items()
            if observed.owns_entry(name, instance)}

def _registry_problem(spec: ServiceSpec, desired: DesiredState, observed: ObservedState,
                      release: Release, instance: str, managed_by: str = "git") -> str | None:
    """Why the Registry entry needs writing, or None when it is right (or not ours to check)."""
    if not spec.register or observed.registry is None:
        return None
    entry = observed.registry.get(spec.name)
    if entry is None:
        return "registry entry missing"
    facts = observed.hosts.get(spec.host)
    inst = facts.current(spec.name) if facts else None
    node = inst.nodes[0] if inst and inst.nodes else None  # a Swarm service in host mode: a node it answers on
    expected = expected_registry_entry(spec, desired.hosts[spec.host], release, instance, managed_by, node)
    wrong = [f for f in ("endpoint", "status", "metadata") if getattr(entry, f) != expected[f]]
    if spec.droplet_id is not None and entry.id != spec.droplet_id:
        wrong.append("id")
    return f"registry entry wrong: {', '.join(wrong)}" if wrong else None


# --------------------------------------------------------------------------- per service


def _plan_service(spec: ServiceSpec, release: Release, desired: DesiredState, observed: ObservedState,
                  managed_on: set[str], quarantined: str | None, force: bool,
                  instance: str, interrupted: str | None = None, managed_by: str = "git") -> list[Action]:
    """A one-host service: its action on its host, and a PRUNE where it ran before (once the new host acts)."""
    host = spec.host
    elsewhere = sorted(h for h in managed_on if h != host)
    action = plan_host(spec, host, release, observed, quarantined, force, interrupted, managed_by, elsewhere,
                        lambda: _registry_problem(spec, desired, observed, release, instance, managed_by))
    if action.kind not in (ActionKind.DEPLOY, ActionKind.REGISTER, ActionKind.NOOP):
        return [action]  # the old host (if moved) keeps serving until the new one can be acted on
    return [action] + [Action(service=spec.name, host=old, kind=ActionKind.PRUNE, release=None,
                              current_release=current_release(observed, old, spec.name),
                              reasons=[f"moved to {host}"]) for old in elsewhere]

def plan_out_of_band(wanted: Mapping[str, tuple[ServiceSpec, Release]], desired: DesiredState,
                     observed: ObservedState, quarantined: Mapping[str, str] | None = None,
                     instance: str = "default") -> list[Action]:
    """Actions for the services the older POST /deploy deployed (``wanted``: the release each should run).

    The same rules as git's, matched on their own (``managed_by: api``) instances: a stopped or unhealthy one is
    started again, a lost Registry entry written again. A commit never prunes them; a name git now manages is
    left to git's plan (which leaves the out-of-band instance untouched).
    """
    quarantined = quarantined or {}
    actions: list[Action] = []
    for name, (spec, release) in sorted(wanted.items()):
        if name in desired.services or name in desired.broken:
            continue
        if spec.host not in desired.hosts:
            actions.append(Action(service=name, host=spec.host, kind=ActionKind.BLOCKED, release=release.id,
                                  reasons=[f"host {spec.host} is no longer in hosts.yaml; out-of-band release "
                                           "left as is"]))
            continue
        actions.extend(_plan_service(spec, release, desired, observed, set(), quarantined.get(name), False,
                                     instance, managed_by="api"))
    return sorted(actions, key=sort_key)


def _plan_broken(name: str, desired: DesiredState, observed: ObservedState) -> list[Action]:
    """A broken manifest: say why, touch nothing (one action per host it is observed on)."""
    errors = desired.errors_for(name)
    first = str(errors[0]) if errors else "unknown error"
    reason = f"manifest invalid: {first}; running release left as is"
    hosts = sorted({h for h, f in observed.hosts.items() for i in f.instances if i.service == name}) or [""]
    out = []
    for host in hosts:
        inst = current_managed(observed.hosts[host], name) if host else None
        out.append(Action(service=name, host=host, kind=ActionKind.BLOCKED, reasons=[reason],
                          current_release=inst.release if inst else None))
    return out


def _plan_removed(desired: DesiredState, observed: ObservedState, managed: list[Instance],
                  registry_owned: dict[str, str]) -> list[Action]:
    """PRUNE what git no longer names; refuse when the desired state could not be read in full."""
    keep = set(desired.services) | desired.broken
    targets: dict[tuple[str, str], Instance | None] = {}
    for m in managed:
        if m.service not in keep:
            key = (m.service, m.host)
            if targets.get(key) is None or m.current:
                targets[key] = m
    pruned_services = {s for s, _ in targets}
    for name, host in registry_owned.items():
        if name not in keep and name not in pruned_services:
            targets[(name, host)] = None  # only the Registry entry is left

    out = []
    for (name, host), inst in sorted(targets.items()):
        current = inst.release if inst else None
        if not desired.complete:
            out.append(Action(service=name, host=host, kind=ActionKind.BLOCKED, current_release=current,
                              reasons=["hosts.yaml invalid; prune refused until the desired state is whole"]))
            continue
        # only the Registry entry seen: prune it only when the runtime it names (any, if none) answered there
        method = str(((observed.registry or {})[name].metadata or {}).get("method", "")) if inst is None else ""
        if inst is None and host and (why := unreachable(observed, host, [method] if method else
                                                          _RUNTIMES)) is not None:
            out.append(Action(service=name, host=host, kind=ActionKind.BLOCKED, current_release=None,
                              reasons=[why]))
            continue
        reason = "removed from git" if inst else "removed from git (registry entry only)"
        out.append(Action(service=name, host=host, kind=ActionKind.PRUNE, current_release=current, reasons=[reason]))
    return out


def _empty_guard(name: str, managed: list[Instance], registry_owned: dict[str, str]) -> Action:
    hosts = sorted({i.host for i in managed if i.service == name})
    current = next((i.release for i in managed if i.service == name and i.current), None)
    return Action(service=name, host=hosts[0] if hosts else registry_owned.get(name, ""), kind=ActionKind.BLOCKED,
                  current_release=current,
                  reasons=["commit removes every service; prune refused (empty desired state guard: "
                           "`deployerd sync --prune-all` prunes them)"])


# --------------------------------------------------------------------------- output


def describe(actions: Iterable[Action]) -> str:
    """One line per action for ``deployerd plan``: kind, service@host [wave], release, reasons."""
    lines = []
    for a in actions:
        release = a.release or "-"
        if a.current_release and a.current_release != a.release:
            release = f"{a.current_release} -> {release}"
        where = f"{a.service}@{a.host}" if a.host else a.service
        if a.wave is not None:
            where += f" [{waves.label(a.wave)}]"
        lines.append(f"{a.kind.value.upper():<8} {where:<32} {release:<29} {'; '.join(a.reasons)}")
    return "\n".join(lines) if lines else "nothing to do"

"""The planner: desired state + observed state -> ordered actions, each with the reasons it exists.

Pure (no asyncio, no I/O) so every decision is a table test. Safety rules it enforces, whatever the
executor does: nothing is deployed or pruned on a host, or in a runtime of a host (its Docker engine
stopped, or not asked), that could not be observed; a broken manifest
leaves its running release alone; an out-of-band (``managed_by == "api"``) instance is never touched;
a commit that removes every service prunes nothing; a quarantined release is not retried until git
changes (or ``force``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import get_args

from pydantic import BaseModel, Field

from deployerd.desired import DesiredState, Release, ServiceSpec, expected_registry_entry
from deployerd.observed import HostFacts, Instance, ObservedState, RunState


class ActionKind(StrEnum):
    DEPLOY = "deploy"
    REGISTER = "register"
    PRUNE = "prune"
    NOOP = "noop"
    BLOCKED = "blocked"
    RESTORE = "restore"  # the desired release is quarantined and the last good one stopped: restart that


_RUNTIMES: tuple[str, ...] = get_args(ServiceSpec.model_fields["method"].annotation)  # every deployment method

_ORDER = {ActionKind.PRUNE: 0, ActionKind.DEPLOY: 1, ActionKind.RESTORE: 1, ActionKind.REGISTER: 2,
          ActionKind.BLOCKED: 3, ActionKind.NOOP: 4}

INPUT_LABELS = {  # Release.inputs key -> how a reason names it
    "source": "source files",
    "image": "build settings",
    "env": "env",
    "port": "port",
    "health": "health check",
    "host": "host settings",
    "swarm": "swarm settings",
}


class Action(BaseModel):
    """One planned step for one service on one host."""

    service: str
    host: str
    kind: ActionKind
    reasons: list[str] = Field(default_factory=list)
    release: str | None = None  # desired release id
    current_release: str | None = None  # observed current release id
    kept: bool = False  # desired release is kept on the host: restore it, no rebuild


def sort_key(action: Action) -> tuple[int, str, str]:
    return (_ORDER[action.kind], action.service, action.host)


def plan(
    desired: DesiredState,
    observed: ObservedState,
    quarantined: Mapping[str, str] | None = None,
    force: bool = False,
    instance: str = "default",
    interrupted: Mapping[str, str] | None = None,
    prune_all: bool = False,
) -> list[Action]:
    """Every action needed to bring ``observed`` to ``desired``, sorted by `sort_key`.

    ``instance`` is the daemon's name: only Registry entries it owns are compared or pruned.
    ``interrupted`` maps a service to the release its last deploy was deploying when the daemon stopped:
    that release is deployed again even when it already runs, as it may never have been verified healthy,
    registered or retained (or may name the new release while the old code still serves).
    ``prune_all`` lets a commit that removes every service prune them (the empty desired state guard refuses it
    otherwise: an emptied checkout looks just like that); asked for one reconcile by ``sync --prune-all``.
    """
    quarantined = quarantined or {}
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
            if (e.metadata or {}).get("managed_by") == "deployerd"
            and (e.metadata or {}).get("instance", "default") == instance}


def _unreachable(observed: ObservedState, host: str, methods: Iterable[str] = ()) -> str | None:
    """Why ``host`` (or its runtimes ``methods``) cannot be acted on, or None when they were observed."""
    facts = observed.hosts.get(host)
    if facts is None:
        return f"host {host} unreachable: not observed"
    if not facts.reachable:
        return f"host {host} unreachable: {facts.error or 'unknown error'}"
    return next((why for m in methods if (why := facts.unknown(m)) is not None), None)


def _current_managed(facts: HostFacts, service: str, managed_by: str = "git") -> Instance | None:
    mine = [i for i in facts.of_service(service) if i.current and i.managed_by == managed_by]
    running = [i for i in mine if i.state is RunState.RUNNING]
    return running[0] if running else (mine[0] if mine else None)


def _changed(inst: Instance, release: Release) -> list[str]:
    """Which inputs differ between what runs and what git wants, named for humans."""
    if not inst.inputs:
        return [f"release {inst.release}"]
    keys = sorted(set(inst.inputs) | set(release.inputs), key=lambda k: (list(INPUT_LABELS).index(k)
                                                                         if k in INPUT_LABELS else 99, k))
    diff = [INPUT_LABELS.get(k, k) for k in keys if inst.inputs.get(k) != release.inputs.get(k)]
    return diff or [f"release {inst.release}"]


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
    host = spec.host
    base = {"service": spec.name, "host": host, "release": release.id}
    elsewhere = sorted(h for h in managed_on if h != host)

    if (why := _unreachable(observed, host, [spec.method])) is not None:
        # the old host (if moved) keeps serving until the new one (its runtime) can be reached
        return [Action(kind=ActionKind.BLOCKED, reasons=[why], **base)]
    facts = observed.hosts[host]
    inst = _current_managed(facts, spec.name, managed_by)
    current = inst.release if inst else None

    reasons: list[str] = []
    if inst is None:
        if any(i.managed_by != managed_by for i in facts.of_service(spec.name)):
            other = "an out-of-band" if managed_by == "git" else "a git-managed"
            return [Action(kind=ActionKind.BLOCKED, current_release=None, reasons=[
                f"{other} instance of {spec.name} runs on {host}; left untouched"], **base)]
        where = f"cluster {spec.cluster} (removed by hand, or never deployed)" if spec.method == "swarm" else host
        reasons.append(f"not deployed on {where}" + (f" (moving from {', '.join(elsewhere)})" if elsewhere else ""))
    else:
        if inst.release != release.id:
            reasons.append("changed: " + ", ".join(_changed(inst, release)))
            if inst.note:  # Swarm rolled back by itself, after the deploy's own verdict
                reasons.append(inst.note)
        if inst.state is not RunState.RUNNING:
            reasons.append(f"not running ({inst.state.value})")
        elif inst.healthy is False:
            reasons.append("unhealthy")
        if inst.drift:  # a Swarm service scaled or updated by hand
            reasons.append(inst.drift)
        others = [i for i in facts.of_service(spec.name) if i.state is RunState.RUNNING and i is not inst
                  and i.managed_by == "git"]
        if others:  # an interrupted switch behind an ingress: finish it, so one instance serves
            reasons.append(f"{len(others)} more instance(s) running ({', '.join(i.release for i in others)})")
        if inst.release == release.id and interrupted == release.id:
            reasons.append("its deploy was interrupted (daemon stopped): verify, register and retain it again")

    actions: list[Action] = []
    if reasons:
        if quarantined == release.id and not force:
            why = f"release {release.id} quarantined after a failed deploy; waiting for git to change"
            if inst is not None and inst.release != release.id and inst.state is not RunState.RUNNING:
                # what serves meanwhile is the last good release: drift on it is healed like any other
                return [Action(kind=ActionKind.RESTORE, service=spec.name, host=host, release=inst.release,
                               current_release=current, kept=True,
                               reasons=[why, f"last good release {inst.release} not running ({inst.state.value}): "
                                             "restart it"])]
            return [Action(kind=ActionKind.BLOCKED, current_release=current, reasons=[why], **base)]
        kept = release.id in facts.releases_kept.get(spec.name, []) and (inst is None or inst.release != release.id
                                                                      or inst.state is not RunState.RUNNING)
        if kept:
            reasons.append("kept release, no rebuild")
        reg = _registry_problem(spec, desired, observed, release, instance, managed_by)
        if reg == "registry entry missing":
            reasons.append(reg)  # the Register phase of the deploy writes it
        actions.append(Action(kind=ActionKind.DEPLOY, current_release=current, reasons=reasons, kept=kept, **base))
    elif (reg := _registry_problem(spec, desired, observed, release, instance, managed_by)) is not None:
        actions.append(Action(kind=ActionKind.REGISTER, current_release=current, reasons=[reg], **base))
    else:
        actions.append(Action(kind=ActionKind.NOOP, current_release=current, reasons=["in sync"], **base))

    for old in elsewhere:
        old_inst = _current_managed(observed.hosts[old], spec.name)
        actions.append(Action(service=spec.name, host=old, kind=ActionKind.PRUNE, release=None,
                              current_release=old_inst.release if old_inst else None,
                              reasons=[f"moved to {host}"]))
    return actions


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
        inst = _current_managed(observed.hosts[host], name) if host else None
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
        if inst is None and host and (why := _unreachable(observed, host, [method] if method else
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
    """One line per action for ``deployerd plan``: kind, service@host, release, reasons."""
    lines = []
    for a in actions:
        release = a.release or "-"
        if a.current_release and a.current_release != a.release:
            release = f"{a.current_release} -> {release}"
        where = f"{a.service}@{a.host}" if a.host else a.service
        lines.append(f"{a.kind.value.upper():<8} {where:<32} {release:<29} {'; '.join(a.reasons)}")
    return "\n".join(lines) if lines else "nothing to do"

"""Where a docker or systemd service runs: ``host: web-1`` (one host) or ``hosts:`` (a fleet), checked against
hosts.yaml before the manifest is validated, and the ``rollout`` fields that fit the service.

``hosts: [web-1, web-2]`` names hosts of hosts.yaml; ``hosts: {tag: web}`` takes every host tagged ``web``, in
hosts.yaml order. The loader fills in ``fleet`` (the resolved hosts) and ``host`` (the first of them), so code
written for one host keeps working. Every error names the file and the field (``hosts[1]``, ``hosts.tag``).
"""

from __future__ import annotations

from typing import Any

from deployerd.schema import FLEET_ROLLOUT, HOSTS_FILE, SWARM_ROLLOUT, HostSpec, ManifestError, ServiceSpec
from deployerd.validation import Invalid, key_name


def _shown(value: Any) -> str:
    return repr(key_name(value)[:64])


def place_on_hosts(file: str, doc: dict[str, Any], hosts: dict[str, HostSpec] | None) -> None:
    """Resolve a manifest's ``hosts`` into ``fleet`` and ``host`` in ``doc``; raise Invalid naming the field.
    ``hosts`` None: hosts.yaml is broken (and the service with it)."""
    if "fleet" in doc:
        raise Invalid([ManifestError(file=file, field="fleet",
                                     reason="unknown field (the hosts a service runs on are given as hosts)")])
    if "hosts" not in doc:
        return
    if doc.get("method") == "swarm":
        raise Invalid([ManifestError(file=file, field="hosts",
                                     reason="only for method docker or systemd (a swarm service names its cluster)")])
    if "host" in doc:
        raise Invalid([ManifestError(file=file, field="host",
                                     reason="give host (one host) or hosts (several), not both")])
    if hosts is None:
        raise Invalid([ManifestError(file=file, field="hosts",
                                     reason=f"{HOSTS_FILE} is invalid, so the hosts named are unknown")])
    fleet = _resolve(file, doc["hosts"], hosts)
    doc["host"], doc["fleet"] = fleet[0], fleet


def _resolve(file: str, raw: Any, hosts: dict[str, HostSpec]) -> list[str]:
    if isinstance(raw, dict):
        if set(raw) != {"tag"}:
            extra = next((k for k in raw if k != "tag"), None)
            field = "hosts.tag" if extra is None else f"hosts.{key_name(extra)[:64]}"
            raise Invalid([ManifestError(file=file, field=field, reason="required field missing" if extra is None
                                         else "unknown field (hosts: {tag: <tag>} selects hosts by tag)")])
        tag = raw["tag"]
        tagged = [name for name, h in hosts.items() if isinstance(tag, str) and tag in h.tags]
        if not tagged:
            raise Invalid([ManifestError(file=file, field="hosts.tag",
                                         reason=f"no host has tag {_shown(tag)} (tags: in {HOSTS_FILE})")])
        return tagged
    if not isinstance(raw, list):
        raise Invalid([ManifestError(file=file, field="hosts",
                                     reason="must be a list of host names or {tag: <tag>}")])
    if not raw:
        raise Invalid([ManifestError(file=file, field="hosts", reason="must name at least one host")])
    errors: list[ManifestError] = []
    seen: set[str] = set()
    for i, name in enumerate(raw):
        field = f"hosts[{i}]"
        if not isinstance(name, str):
            errors.append(ManifestError(file=file, field=field, reason="must be a host name (a string)"))
        elif name not in hosts:
            errors.append(ManifestError(file=file, field=field,
                                        reason=f"unknown host {_shown(name)} (not in {HOSTS_FILE})"))
        elif name in seen:
            errors.append(ManifestError(file=file, field=field, reason=f"host {_shown(name)} is listed twice"))
        else:
            seen.add(name)
    if errors:
        raise Invalid(errors)
    return list(raw)


def rollout_errors(file: str, spec: ServiceSpec) -> list[ManifestError]:
    """Swarm's rollout fields are for a swarm service, the waves' for a service on several hosts: a field that
    would be ignored is refused, naming it."""
    given = spec.rollout.model_fields_set
    if spec.method == "swarm":
        return [ManifestError(file=file, field=f"rollout.{f}", reason="only for a service on several hosts (hosts:)")
                for f in FLEET_ROLLOUT if f in given]
    wrong = [ManifestError(file=file, field=f"rollout.{f}", reason="only for method: swarm")
             for f in SWARM_ROLLOUT if f in given]
    if not spec.fleet:
        wrong += [ManifestError(file=file, field=f"rollout.{f}", reason=(
            "only for a service on several hosts (hosts: [...] or hosts: {tag: ...}); host: is one host"))
            for f in FLEET_ROLLOUT if f in given]
    return wrong

"""Desired state: hosts.yaml + services/*.yaml at one revision, loaded, validated, with a release id per service.

Everything read here is hostile input: files are size-checked and parsed by a strict YAML loader, then
validated against the schema (``schema.py``), and a source folder is checked to stay inside the tree. A
broken manifest fails that service alone: it is listed in ``DesiredState.broken`` so the planner leaves its
running release as it is instead of pruning it. Release ids come from ``releases.py``.

The schema's and the releases' public names are re-exported here: ``from deployerd.desired import ...``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from deployerd import clusters, placement
from deployerd.releases import compute_release, endpoint_url, expected_registry_entry, fleet_releases
from deployerd.schema import (
    HOSTS_FILE,
    SERVICES_DIR,
    DesiredState,
    DockerSpec,
    HealthSpec,
    HostSpec,
    ManifestError,
    Release,
    ServiceSpec,
    SystemdSpec,
)
from deployerd.tree import Entry, Tree, TreeError
from deployerd.validation import Invalid as _Invalid
from deployerd.validation import key_name as _key_name
from deployerd.validation import translate as _translate

__all__ = [
    "HOSTS_FILE", "MAX_MANIFEST_BYTES", "MAX_SOURCE_BYTES", "MAX_SOURCE_FILE_BYTES", "SERVICES_DIR", "DesiredState",
    "DockerSpec", "HealthSpec", "HostSpec", "ManifestError", "Release", "ServiceSpec", "SystemdSpec",
    "compute_release", "endpoint_url", "expected_registry_entry", "load_desired", "load_hosts", "source_release",
]

MAX_MANIFEST_BYTES = 256 * 1024
MAX_SOURCE_FILE_BYTES = 100 * 1024 * 1024  # one file in a source folder
MAX_SOURCE_BYTES = 1024 * 1024 * 1024  # a whole source folder


# --------------------------------------------------------------------------- YAML


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (billion-laughs) and duplicate keys (silent overrides)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # the stubs leave it untyped
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let the base class report it
                continue
            if dup:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {str(key)[:64]!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(file: str, data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise _Invalid([ManifestError(file=file, reason=f"file larger than {MAX_MANIFEST_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid([ManifestError(file=file, reason=f"not UTF-8 (byte {exc.start})")]) from None
    try:
        doc = yaml.load(text, Loader=StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = f"YAML syntax error at {where}{exc.problem or exc.context}"
        raise _Invalid([ManifestError(file=file, reason=reason)]) from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise _Invalid([ManifestError(file=file, reason=f"YAML error: {str(exc)[:200]}")]) from None
    if doc is None:
        raise _Invalid([ManifestError(file=file, reason="file is empty")])
    if not isinstance(doc, dict):
        raise _Invalid([ManifestError(file=file, reason="must be a YAML mapping of field: value")])
    return doc


# --------------------------------------------------------------------------- hosts.yaml


def load_hosts(tree: Tree) -> dict[str, HostSpec]:
    """Parse hosts.yaml: ``hosts: {<name>: {address, ssh_port, user, base_dir, public_address, ingress, tags}}`` and
    ``clusters: {<name>: {manager, registry}}`` (each manager's HostSpec carries its cluster)."""
    file = HOSTS_FILE
    _check_regular_file(tree, file)
    doc = _parse_yaml(file, tree.read(file))
    errors: list[ManifestError] = [ManifestError(file=file, field=_key_name(k)[:64], reason="unknown field")
                                   for k in doc if k not in ("hosts", "clusters")]
    raw = doc.get("hosts")
    if not isinstance(raw, dict) or not raw:
        errors.append(ManifestError(file=file, field="hosts",
                                    reason="must be a non-empty mapping of host name to settings"))
        raise _Invalid(errors)
    hosts: dict[str, HostSpec] = {}
    for name, body in raw.items():
        field = f"hosts.{_key_name(name)[:64]}"
        if not isinstance(name, str):
            errors.append(ManifestError(file=file, field=field, reason="host name must be a string"))
            continue
        if not isinstance(body, dict):
            errors.append(ManifestError(file=file, field=field, reason="must be a mapping"))
            continue
        if "name" in body and body["name"] != name:
            errors.append(ManifestError(file=file, field=f"{field}.name", reason="must equal the key it is under"))
            continue
        if wrong := clusters.host_field_errors(file, field, body):
            errors.extend(wrong)
            continue
        try:
            hosts[name] = HostSpec.model_validate({**body, "name": name})
        except ValidationError as exc:
            errors.extend(_translate(file, exc, ("hosts", name)))
    errors.extend(_same_machine(hosts))
    errors.extend(clusters.load_clusters(doc.get("clusters", {}), hosts))
    if errors:
        raise _Invalid(errors)
    return hosts


def machine_key(host: HostSpec) -> tuple[str, int]:
    """What reaches one SSH server: the address (IPs in canonical form, names case-folded) and the port."""
    try:
        address = str(ipaddress.ip_address(host.address))
    except ValueError:
        address = host.address.lower().rstrip(".")
    return address, host.ssh_port


def _same_machine(hosts: dict[str, HostSpec]) -> list[ManifestError]:
    """Two entries reaching one machine would each see the other's services and prune them as "moved"."""
    seen: dict[tuple[str, int], list[str]] = {}
    for name, spec in hosts.items():
        seen.setdefault(machine_key(spec), []).append(name)
    return [ManifestError(file=HOSTS_FILE, field=f"hosts.{name}",
                          reason=f"reaches the same machine as {', '.join(n for n in names if n != name)} "
                                 f"({address} port {port}): one entry per machine")
            for (address, port), names in seen.items() if len(names) > 1 for name in names]


def _check_regular_file(tree: Tree, file: str) -> None:
    found = [e for e in tree.entries(file) if e.path == file]
    if not found:
        raise _Invalid([ManifestError(file=file, reason="file not found")])
    if found[0].kind != "file":
        raise _Invalid([ManifestError(file=file, reason="must be a regular file (not a symlink or special file)")])
    _check_manifest_size(found[0])


def _check_manifest_size(entry: Entry) -> None:
    """Refuse an oversized manifest before reading it (reading first would load all of it into memory)."""
    if entry.size > MAX_MANIFEST_BYTES:
        raise _Invalid([ManifestError(file=entry.path, reason=f"file larger than {MAX_MANIFEST_BYTES} bytes")])


# --------------------------------------------------------------------------- services


def _load_service(tree: Tree, file: str, stem: str, hosts: dict[str, HostSpec] | None) -> ServiceSpec:
    """One manifest; ``hosts``: those of a valid hosts.yaml (None: it is broken)."""
    doc = _parse_yaml(file, tree.read(file))
    clusters.place_on_cluster(file, doc, clusters.clusters_of(hosts) if hosts is not None else None)
    placement.place_on_hosts(file, doc, hosts)
    try:
        spec = ServiceSpec.model_validate(doc)
    except ValidationError as exc:
        raise _Invalid(_translate(file, exc)) from None
    if spec.name != stem:
        raise _Invalid([ManifestError(file=file, field="name", reason=f"must equal the file name {stem!r}")])
    if wrong := clusters.service_errors(file, spec) + placement.rollout_errors(file, spec):
        raise _Invalid(wrong)
    return spec


def _resolve_link(links: dict[str, str], base: list[str], target: str, depth: int = 0) -> list[str] | None:
    """Resolve ``target`` from folder ``base`` inside a source folder, following its symlinks.

    Returns the resolved components, or None if the walk leaves the folder (or loops). Resolution is
    real, not lexical: ``s/../x`` with ``s -> .`` climbs out, and is caught.
    """
    if depth > 40 or target.startswith("/"):
        return None
    stack = list(base)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return None
            stack.pop()
            continue
        candidate = "/".join([*stack, comp])
        if candidate in links:
            resolved = _resolve_link(links, stack, links[candidate], depth + 1)
            if resolved is None:
                return None
            stack = resolved
        else:
            stack.append(comp)
    return stack


def _check_source(tree: Tree, file: str, spec: ServiceSpec) -> list[Entry]:
    """The source folder's entries, after refusing escapes, special files and a missing Dockerfile."""
    src = spec.source
    if src == SERVICES_DIR or src == HOSTS_FILE:
        raise _Invalid([ManifestError(file=file, field="source", reason="must name a service's own folder")])
    if not tree.is_dir(src):
        raise _Invalid([ManifestError(file=file, field="source", reason=f"folder {src!r} not found in the repository")])
    entries = tree.entries(src)
    rel = {e.path[len(src) + 1:]: e for e in entries}
    links = {p: e.link_target or "" for p, e in rel.items() if e.kind == "symlink"}
    errors = []
    total = sum(e.size for e in entries if e.kind == "file")
    if total > MAX_SOURCE_BYTES:
        errors.append(ManifestError(file=file, field="source",
                                    reason=f"folder {src!r} holds {total} bytes, more than {MAX_SOURCE_BYTES}"))
    for path, entry in rel.items():
        if entry.kind == "file" and entry.size > MAX_SOURCE_FILE_BYTES:
            errors.append(ManifestError(file=file, field="source",
                                        reason=f"{entry.path!r} is larger than {MAX_SOURCE_FILE_BYTES} bytes"))
        elif entry.kind == "other":
            errors.append(ManifestError(file=file, field="source",
                                        reason=f"{entry.path!r} is not a regular file or symlink "
                                               "(device, fifo, socket or submodule)"))
        elif entry.kind == "symlink":
            target = entry.link_target or ""
            if target.startswith("/"):
                errors.append(ManifestError(file=file, field="source",
                                            reason=f"symlink {entry.path!r} has an absolute target"))
            elif _resolve_link(links, path.split("/")[:-1], target) is None:
                errors.append(ManifestError(file=file, field="source",
                                            reason=f"symlink {entry.path!r} points outside the source folder"))
    if spec.builds_image:
        df = rel.get(spec.docker.dockerfile)
        if df is None or df.kind != "file":
            errors.append(ManifestError(file=file, field="docker.dockerfile",
                                        reason=f"{spec.docker.dockerfile!r} is not a file in {src!r}"))
    if errors:
        raise _Invalid(errors)
    return entries


def source_release(tree: Tree, spec: ServiceSpec, host: HostSpec, file: str) -> Release:
    """Check a service's source folder in ``tree`` by the manifest rules and compute its release.

    For sources that do not come from a manifest (the older ``POST /deploy``); ``file`` names the origin
    in errors. Raises ValueError listing every problem.
    """
    try:
        entries = _check_source(tree, file, spec)
    except _Invalid as e:
        raise ValueError("; ".join(str(err) for err in e.errors)) from None
    return compute_release(spec, host, entries)


# --------------------------------------------------------------------------- load


def _manifest_files(tree: Tree) -> dict[str, list[Entry]]:
    """stem -> manifest entries directly in services/ (subfolders hold sources)."""
    out: dict[str, list[Entry]] = {}
    if not tree.is_dir(SERVICES_DIR):
        return out
    for e in tree.entries(SERVICES_DIR):
        rest = e.path[len(SERVICES_DIR) + 1:]
        if "/" in rest:
            continue
        stem, dot, ext = rest.rpartition(".")
        if dot and ext in ("yaml", "yml") and stem:
            out.setdefault(stem, []).append(e)
    return out


def load_desired(tree: Tree, revision: str, incumbents: Mapping[str, ServiceSpec] | None = None) -> DesiredState:
    """Validate the tree; a broken manifest fails that service alone, a broken hosts.yaml fails all.

    ``incumbents`` are the services as validated at the last applied commit: in a clash (a port, a droplet
    id) between one of them, unchanged, and a newcomer, the newcomer alone is blocked."""
    errors: list[ManifestError] = []
    hosts: dict[str, HostSpec] = {}
    hosts_ok = True
    try:
        hosts = load_hosts(tree)
    except _Invalid as exc:
        errors.extend(exc.errors)
        hosts_ok = False
    except (TreeError, OSError) as exc:
        errors.append(ManifestError(file=HOSTS_FILE, reason=str(exc)))
        hosts_ok = False

    specs: dict[str, tuple[str, ServiceSpec]] = {}
    broken: set[str] = set()
    for stem, files in sorted(_manifest_files(tree).items()):
        file = files[0].path
        try:
            if len(files) > 1:
                raise _Invalid([ManifestError(file=f.path, reason="two manifests for one service (.yaml and .yml)")
                                for f in files])
            if files[0].kind != "file":
                raise _Invalid([ManifestError(file=file,
                                              reason="must be a regular file (not a symlink or special file)")])
            _check_manifest_size(files[0])
            spec = _load_service(tree, file, stem, hosts if hosts_ok else None)
            if hosts_ok and spec.host not in hosts:
                raise _Invalid([ManifestError(file=file, field="host",
                                              reason=f"unknown host {spec.host!r} (not in hosts.yaml)")])
            specs[stem] = (file, spec)
        except _Invalid as exc:
            errors.extend(exc.errors)
            broken.add(stem)
        except (TreeError, OSError) as exc:
            errors.append(ManifestError(file=file, reason=str(exc)))
            broken.add(stem)

    errors.extend(_check_unique(specs, broken, incumbents or {}))

    services: dict[str, ServiceSpec] = {}
    releases: dict[str, Release] = {}
    host_releases: dict[str, dict[str, Release]] = {}
    for stem, (file, spec) in specs.items():
        if stem in broken:
            continue
        try:
            source = _check_source(tree, file, spec)
        except _Invalid as exc:
            errors.extend(exc.errors)
            broken.add(stem)
            continue
        except (TreeError, OSError) as exc:
            errors.append(ManifestError(file=file, field="source", reason=str(exc)))
            broken.add(stem)
            continue
        if hosts_ok:
            services[stem] = spec
            host_releases[stem] = fleet_releases(spec, [hosts[h] for h in spec.placed_on], source)
            releases[stem] = host_releases[stem][spec.host]
        else:
            broken.add(stem)
    if not hosts_ok:
        broken.update(specs)
    return DesiredState(revision=revision, hosts=hosts, services=services, releases=releases,
                        host_releases=host_releases, errors=errors, broken=broken, complete=hosts_ok)


def _check_unique(specs: dict[str, tuple[str, ServiceSpec]], broken: set[str],
                  incumbents: Mapping[str, ServiceSpec]) -> list[ManifestError]:
    """Ports on each host a service is placed on, and droplet ids, must be unique. In a clash, a service unchanged
    since the last applied commit keeps its place and the others are broken; with no such service every one of
    them is (neither wins)."""
    errors: list[ManifestError] = []
    ports: dict[tuple[str, int], list[str]] = {}
    ids: dict[int, list[str]] = {}
    for stem, (_, spec) in specs.items():
        for host in spec.placed_on:
            ports.setdefault((host, spec.port), []).append(stem)
        if spec.droplet_id is not None:
            ids.setdefault(spec.droplet_id, []).append(stem)
    clashes = [("port", f"port {port} on host {host}", names) for (host, port), names in ports.items()]
    clashes += [("droplet_id", f"droplet_id {did}", names) for did, names in ids.items()]
    for field, what, names in clashes:
        if len(names) < 2:
            continue
        settled = [n for n in names if incumbents.get(n) == specs[n][1]]
        if len(settled) == 1:
            keeper = settled[0]
            for name in names:
                if name != keeper:
                    errors.append(ManifestError(
                        file=specs[name][0], field=field,
                        reason=f"{what} is already used by {keeper} ({specs[keeper][0]}, unchanged since the "
                               f"last applied commit): {name} is blocked, {keeper} keeps running"))
                    broken.add(name)
            continue
        for name in names:
            others = ", ".join(f"{n} ({specs[n][0]})" for n in names if n != name)
            errors.append(ManifestError(file=specs[name][0], field=field, reason=f"{what} is also used by {others}"))
            broken.add(name)
    return errors

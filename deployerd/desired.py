"""Desired state: hosts.yaml + services/*.yaml at one revision, validated, with a release id per service.

Everything read here is hostile input (anyone who can push to the repo writes it), so names, paths and
values are checked strictly before any of them reaches a shell, a path join or a container label. A
broken manifest fails that service alone: it is listed in ``DesiredState.broken`` so the planner leaves
its running release as it is instead of pruning it.

A release id hashes exactly what defines a deployment (source files, build/run settings, env, port,
health check, host), so a commit that touches nothing of a service keeps its id, and each input's own
digest lets the planner name *which* input changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import posixpath
import re
import warnings
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from deployerd.tree import Entry, Tree, TreeError

HOSTS_FILE = "hosts.yaml"
SERVICES_DIR = "services"
MAX_MANIFEST_BYTES = 256 * 1024
MAX_SOURCE_FILE_BYTES = 100 * 1024 * 1024  # one file in a source folder
MAX_SOURCE_BYTES = 1024 * 1024 * 1024  # a whole source folder

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_POSIX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")
_HEALTH_PATH = re.compile(r"/[\x21-\x7e]*")


# --------------------------------------------------------------------------- field validators


def _dns_label(v: str) -> str:
    if not _DNS_LABEL.fullmatch(v):
        raise ValueError("must be a DNS label: lowercase letters, digits and '-', 1-63 chars, "
                         "not starting or ending with '-'")
    return v


def _address(v: str) -> str:
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(v):
        raise ValueError("must be a hostname or an IP address")
    return v


def _posix_user(v: str) -> str:
    if not _POSIX_USER.fullmatch(v):
        raise ValueError("must be a POSIX user name ([a-z_][a-z0-9_-]*, at most 32 chars)")
    return v


def _port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise ValueError("must be between 1 and 65535")
    return v


def _base_dir(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    if not _SAFE_PATH.fullmatch(v):
        raise ValueError("may contain only letters, digits and . _ / -")
    if ".." in v.split("/") or posixpath.normpath(v) != v:
        raise ValueError("must be a normalized path without '..'")
    if v == "/":
        raise ValueError("must not be the root directory")
    return v


def _rel_path(v: str) -> str:
    """A plain relative path inside the repository (or inside a source folder)."""
    if not v or v.startswith("/"):
        raise ValueError("must be a relative path")
    if not _SAFE_PATH.fullmatch(v):
        raise ValueError("may contain only letters, digits and . _ / -")
    parts = v.split("/")
    if ".." in parts:
        raise ValueError("must not contain '..'")
    if posixpath.normpath(v) != v or v == ".":
        raise ValueError("must be a normalized path naming a folder or file, e.g. 'services/web'")
    if any(p.startswith("-") for p in parts):
        raise ValueError("path components must not start with '-'")
    return v


def _one_line(v: str) -> str:
    if "\0" in v or "\n" in v or "\r" in v:
        raise ValueError("must not contain NUL or newline characters")
    return v


def _env(v: dict[str, str]) -> dict[str, str]:
    for key, value in v.items():
        if not _ENV_KEY.fullmatch(key):
            raise ValueError(f"key {key[:64]!r} must match [A-Za-z_][A-Za-z0-9_]*")
        try:
            _one_line(value)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return v


def _secret_names(v: list[str]) -> list[str]:
    seen: set[str] = set()
    for i, name in enumerate(v):
        if not _ENV_KEY.fullmatch(name):  # not echoed: a value written here by mistake must not spread
            raise ValueError(f"item {i} must be a name matching [A-Za-z_][A-Za-z0-9_]* "
                             "(values never go in the manifest)")
        if name in seen:
            raise ValueError(f"{name} is listed twice")
        seen.add(name)
    return v


def _health_path(v: str) -> str:
    if not _HEALTH_PATH.fullmatch(v):
        raise ValueError("must start with '/' and contain only printable ASCII without spaces")
    return v


def _http_url(v: str) -> str:
    if any(not 0x21 <= ord(c) <= 0x7E for c in v):
        raise ValueError("must be printable ASCII without spaces")
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return v


DnsLabel = Annotated[str, AfterValidator(_dns_label)]
Address = Annotated[str, AfterValidator(_address)]
Port = Annotated[int, AfterValidator(_port)]
RelPath = Annotated[str, AfterValidator(_rel_path)]
OneLine = Annotated[str, AfterValidator(_one_line)]
EnvMap = Annotated[dict[str, str], AfterValidator(_env)]


class _Model(BaseModel):
    # strict: YAML "8010" is not a port and "yes" is not a bool; say so rather than guess
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- schema


def _registry_address(v: str) -> str:
    """``host:port`` (or ``[v6]:port``) of an image registry, as an image reference's first component."""
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("must be host:port, e.g. 'host-a:5000'")
    _port(int(port))
    _address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    return v


class ClusterSpec(_Model):
    """A Docker Swarm (hosts.yaml ``clusters``): driven through its manager's engine, which builds the images
    and pushes them to the cluster's image registry, from which every node pulls."""

    name: DnsLabel
    manager: DnsLabel  # a host from ``hosts``
    registry: Annotated[str, AfterValidator(_registry_address)]


class HostSpec(_Model):
    """A server deployerd reaches over SSH."""

    name: DnsLabel
    address: Address
    ssh_port: Port = 22
    user: Annotated[str, AfterValidator(_posix_user)] = "root"
    base_dir: Annotated[str, AfterValidator(_base_dir)] = "/opt/fpai/services"
    public_address: Address | None = None  # what the Registry endpoint advertises (default: address)
    # haproxy: a proxy deployerd runs on the host binds the public ports; a new release starts beside the old
    # one on a private port and takes traffic once healthy (zero downtime). none: the old stops first.
    ingress: Literal["haproxy", "none"] = "none"
    # Set from hosts.yaml ``clusters`` (not a host field there): the Swarm this host manages, so its Swarm
    # runtime observes the cluster's services and a past release's record knows its registry.
    manages: ClusterSpec | None = None


class HealthSpec(_Model):
    """How Verify Health decides a new instance is serving."""

    path: Annotated[str, AfterValidator(_health_path)] = "/health"
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    interval_s: float = Field(default=1.0, gt=0, le=60)
    url: Annotated[str, AfterValidator(_http_url)] | None = None  # overrides http://host:port{path}


class DockerSpec(_Model):
    """Build and run settings for ``method: docker``."""

    dockerfile: RelPath = "Dockerfile"  # relative to the source folder
    build_args: EnvMap = Field(default_factory=dict)
    container_port: Port | None = None  # defaults to the service port
    restart: Literal["no", "always", "unless-stopped", "on-failure"] = "unless-stopped"


class SystemdSpec(_Model):
    """Run settings for ``method: systemd`` (a Python app run by a unit file)."""

    command: Annotated[str, AfterValidator(_one_line), Field(min_length=1, max_length=4096)] = (
        "uvicorn app.main:app --host 0.0.0.0 --port {port}")
    requirements: RelPath = "requirements.txt"
    user: Annotated[str, AfterValidator(_posix_user)] | None = None


_CONSTRAINT = re.compile(r"[A-Za-z0-9_.-]+ ?(==|!=) ?[A-Za-z0-9_.:-]+")


def _constraints(v: list[str]) -> list[str]:
    for i, c in enumerate(v):
        if not _CONSTRAINT.fullmatch(c):
            raise ValueError(f"item {i} must be '<attribute>==<value>' or '<attribute>!=<value>', "
                             "e.g. 'node.role==worker'")
    return v


class PlacementSpec(_Model):
    """Where Swarm may place a ``method: swarm`` service's tasks."""

    constraints: Annotated[list[str], AfterValidator(_constraints), Field(max_length=20)] = Field(default_factory=list)


class RolloutSpec(_Model):
    """How a ``method: swarm`` update rolls out (Swarm's update_config, and the same for its rollback)."""

    parallelism: Annotated[int, Field(ge=0, le=1000)] = 1  # tasks updated at once (0: all)
    delay_s: float = Field(default=0.0, ge=0, le=3600)  # between two batches
    order: Literal["start-first", "stop-first"] = "start-first"
    failure_action: Literal["rollback", "pause"] = "rollback"
    monitor_s: float = Field(default=5.0, gt=0, le=3600)  # how long a new task is watched for failure
    max_failure_ratio: float = Field(default=0.0, ge=0, le=1)


# "register" (a manifest field) shadows ABCMeta.register on the class; harmless, so the warning is muted
warnings.filterwarnings("ignore", message='Field name "register" in "ServiceSpec" shadows', category=UserWarning)


class ServiceSpec(_Model):
    """One service manifest, services/<name>.yaml."""

    name: DnsLabel
    droplet_id: Annotated[int, Field(ge=1)] | None = None
    host: DnsLabel  # for method swarm: the cluster's manager (filled in from hosts.yaml)
    method: Literal["docker", "systemd", "swarm"] = "docker"
    port: Port
    source: RelPath
    cluster: DnsLabel | None = None  # method swarm: a cluster from hosts.yaml
    mode: Literal["replicated", "global"] = "replicated"  # method swarm
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = None  # method swarm, mode replicated (default 1)
    placement: PlacementSpec = PlacementSpec()
    rollout: RolloutSpec = RolloutSpec()
    # ingress: Swarm's routing mesh answers on every node; host: each task answers on its own node's port
    publish_mode: Literal["ingress", "host"] = "ingress"
    public_url: Annotated[str, AfterValidator(_http_url)] | None = None  # the Registry endpoint, when given
    health: HealthSpec = HealthSpec()
    env: EnvMap = Field(default_factory=dict)
    # names only: the daemon resolves the values at deploy time (deployerd.secrets), never from git in clear
    secrets: Annotated[list[str], AfterValidator(_secret_names), Field(max_length=100)] = Field(default_factory=list)
    register: bool = True
    drain_timeout_s: float = Field(default=30.0, ge=0, le=600)  # behind an ingress: requests in flight on the old release
    docker: DockerSpec = DockerSpec()
    systemd: SystemdSpec = SystemdSpec()

    @field_validator("secrets", mode="before")
    @classmethod
    def _names_not_values(cls, v: Any) -> Any:
        if isinstance(v, dict):  # never echo what is there: it may be the values themselves
            raise ValueError("must be a list of secret names; values never go in the manifest "  # noqa: TRY004
                             "(they come from the daemon's secrets file or secrets/<service>.env.age)")
        return v

    @field_validator("secrets")
    @classmethod
    def _not_in_env(cls, v: list[str], info: ValidationInfo) -> list[str]:
        both = sorted(set(v) & set(info.data.get("env") or {}))
        if both:
            raise ValueError(f"{', '.join(both)} also in env: a name is either a plain env value or a secret")
        return v

    @field_validator("replicas")
    @classmethod
    def _replicas_need_replicated(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("mode") == "global":
            raise ValueError("replicas is for mode: replicated (mode: global runs one task per node)")
        return v

    @property
    def container_port(self) -> int:
        return self.docker.container_port or self.port

    @property
    def swarm_replicas(self) -> int | None:
        """Tasks wanted (None: one per node, mode global)."""
        return None if self.mode == "global" else (1 if self.replicas is None else self.replicas)


class ManifestError(BaseModel):
    """One validation failure, naming the file, the field (dotted) and the reason."""

    model_config = ConfigDict(frozen=True)

    file: str
    field: str = ""
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason}" if self.field else f"{self.file}: {self.reason}"


class Release(BaseModel):
    """What defines one deployment of a service: per-input digests and their combined id."""

    model_config = ConfigDict(frozen=True)

    id: str
    inputs: dict[str, str]

    def with_input(self, name: str, digest: str) -> Release:
        """This release with one more input (the daemon adds ``secrets``, whose values git never holds)."""
        inputs = {**self.inputs, name: digest}
        return Release(id=_release_id(inputs), inputs=inputs)


class DesiredState(BaseModel):
    """The validated desired state at one revision.

    ``broken`` holds the file stems of manifests that failed validation: their running release is left
    as it is. ``complete`` is False when hosts.yaml itself is broken: then nothing may be pruned.
    """

    revision: str
    hosts: dict[str, HostSpec] = Field(default_factory=dict)
    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    releases: dict[str, Release] = Field(default_factory=dict)
    errors: list[ManifestError] = Field(default_factory=list)
    broken: set[str] = Field(default_factory=set)
    complete: bool = True

    def errors_for(self, service: str) -> list[ManifestError]:
        """Errors of one service's manifest (or, when hosts.yaml is broken, those of hosts.yaml)."""
        mine = [e for e in self.errors if e.file in (_manifest_path(service, ".yaml"), _manifest_path(service, ".yml"))]
        return mine or [e for e in self.errors if e.file == HOSTS_FILE]


def _manifest_path(stem: str, ext: str) -> str:
    return f"{SERVICES_DIR}/{stem}{ext}"


# --------------------------------------------------------------------------- YAML


class _Invalid(Exception):
    def __init__(self, errors: list[ManifestError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (billion-laughs) and duplicate keys (silent overrides)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # type: ignore[override]
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
        raise _Invalid([ManifestError(file=file, reason=f"YAML syntax error at {where}{exc.problem or exc.context}")]) from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise _Invalid([ManifestError(file=file, reason=f"YAML error: {str(exc)[:200]}")]) from None
    if doc is None:
        raise _Invalid([ManifestError(file=file, reason="file is empty")])
    if not isinstance(doc, dict):
        raise _Invalid([ManifestError(file=file, reason="must be a YAML mapping of field: value")])
    return doc


_REASONS = {
    "extra_forbidden": "unknown field",
    "missing": "required field missing",
    "string_type": "must be a string (quote numbers and booleans in YAML)",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
}


def _key_name(key: Any) -> str:
    """A key as a field name: an empty or unprintable key (newline, control, bidi) is shown quoted and
    escaped, so the field is never blank and never forges a line in a log or the CLI."""
    text = str(key)
    return text if text and text.isprintable() else json.dumps(text)


def _translate(file: str, exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[ManifestError]:
    """Pydantic errors -> ManifestErrors with dotted field paths and plain reasons."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [_key_name(p) for p in (*prefix, *err["loc"]) if p != "[key]"]
        is_key = "[key]" in err["loc"]
        kind = err["type"]
        if kind == "value_error":
            reason = str(err.get("ctx", {}).get("error", err["msg"]))
        elif is_key and kind == "string_type":
            reason = "keys must be strings"
        else:
            reason = _REASONS.get(kind) or err["msg"].replace("Input should be", "must be")
        out.append(ManifestError(file=file, field=".".join(loc)[:200], reason=reason))
    return out


# --------------------------------------------------------------------------- hosts.yaml


def load_hosts(tree: Tree) -> dict[str, HostSpec]:
    """Parse hosts.yaml: ``hosts: {<name>: {address, ssh_port, user, base_dir, public_address}}`` and
    ``clusters: {<name>: {manager, registry}}`` (each manager's HostSpec carries its cluster)."""
    file = HOSTS_FILE
    _check_regular_file(tree, file)
    doc = _parse_yaml(file, tree.read(file))
    errors: list[ManifestError] = [ManifestError(file=file, field=_key_name(k)[:64], reason="unknown field")
                                   for k in doc if k not in ("hosts", "clusters")]
    raw = doc.get("hosts")
    if not isinstance(raw, dict) or not raw:
        errors.append(ManifestError(file=file, field="hosts", reason="must be a non-empty mapping of host name to settings"))
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
        if "manages" in body:
            errors.append(ManifestError(file=file, field=f"{field}.manages",
                                        reason="unknown field (a cluster names its manager under clusters)"))
            continue
        try:
            hosts[name] = HostSpec.model_validate({**body, "name": name})
        except ValidationError as exc:
            errors.extend(_translate(file, exc, ("hosts", name)))
    errors.extend(_load_clusters(file, doc.get("clusters", {}), hosts))
    if errors:
        raise _Invalid(errors)
    return hosts


def _load_clusters(file: str, raw: Any, hosts: dict[str, HostSpec]) -> list[ManifestError]:
    """Validate ``clusters`` and put each on its manager's HostSpec (in ``hosts``); returns the errors."""
    if not isinstance(raw, dict):
        return [ManifestError(file=file, field="clusters", reason="must be a mapping of cluster name to settings")]
    errors: list[ManifestError] = []
    for name, body in raw.items():
        field = f"clusters.{_key_name(name)[:64]}"
        if not isinstance(name, str) or not isinstance(body, dict):
            errors.append(ManifestError(file=file, field=field, reason="must be a mapping (cluster name: settings)"))
            continue
        try:
            cluster = ClusterSpec.model_validate({**body, "name": name})
        except ValidationError as exc:
            errors.extend(_translate(file, exc, ("clusters", name)))
            continue
        manager = hosts.get(cluster.manager)
        if manager is None:
            errors.append(ManifestError(file=file, field=f"{field}.manager",
                                        reason=f"unknown host {cluster.manager!r} (not in hosts)"))
        elif manager.manages is not None:
            errors.append(ManifestError(file=file, field=f"{field}.manager",
                                        reason=f"host {cluster.manager} already manages cluster "
                                               f"{manager.manages.name}"))
        else:
            hosts[cluster.manager] = manager.model_copy(update={"manages": cluster})
    return errors


def clusters_of(hosts: dict[str, HostSpec]) -> dict[str, ClusterSpec]:
    """The clusters of hosts.yaml, by name."""
    return {h.manages.name: h.manages for h in hosts.values() if h.manages is not None}


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


_SWARM_ONLY = ("cluster", "mode", "replicas", "placement", "rollout", "publish_mode")


def _place_on_cluster(file: str, doc: dict[str, Any], clusters: dict[str, ClusterSpec] | None) -> None:
    """A ``method: swarm`` manifest runs on its cluster: its ``host`` is the manager (filled in here);
    Swarm-only fields on another method are refused rather than ignored."""
    if doc.get("method") != "swarm":
        wrong = [ManifestError(file=file, field=k, reason="only for method: swarm") for k in _SWARM_ONLY if k in doc]
        if wrong:
            raise _Invalid(wrong)
        return
    name = doc.get("cluster")
    if name is None:
        raise _Invalid([ManifestError(file=file, field="cluster", reason="required for method: swarm")])
    if clusters is None:  # hosts.yaml itself is broken: the service is broken with it
        raise _Invalid([ManifestError(file=file, field="cluster",
                                      reason=f"{HOSTS_FILE} is invalid, so cluster {str(name)[:64]!r} is unknown")])
    cluster = clusters.get(name) if isinstance(name, str) else None
    if cluster is None:
        raise _Invalid([ManifestError(file=file, field="cluster",
                                      reason=f"unknown cluster {str(name)[:64]!r} (not in hosts.yaml clusters)")])
    if "host" in doc and doc["host"] != cluster.manager:
        raise _Invalid([ManifestError(file=file, field="host", reason=(
            f"a swarm service runs on its cluster; leave host out (cluster {name} is managed by {cluster.manager})"))])
    doc["host"] = cluster.manager


def _load_service(tree: Tree, file: str, stem: str, clusters: dict[str, ClusterSpec] | None = None) -> ServiceSpec:
    doc = _parse_yaml(file, tree.read(file))
    _place_on_cluster(file, doc, clusters)
    try:
        spec = ServiceSpec.model_validate(doc)
    except ValidationError as exc:
        raise _Invalid(_translate(file, exc)) from None
    if spec.name != stem:
        raise _Invalid([ManifestError(file=file, field="name", reason=f"must equal the file name {stem!r}")])
    if spec.method == "swarm" and spec.mode == "global" and spec.publish_mode == "host" \
            and spec.rollout.order == "start-first":
        raise _Invalid([ManifestError(file=file, field="rollout.order", reason=(
            "mode: global with publish_mode: host needs stop-first (the old task holds its node's port, "
            "so a new one could never start beside it)"))])
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
                                        reason=f"{entry.path!r} is not a regular file or symlink (device, fifo, socket or submodule)"))
        elif entry.kind == "symlink":
            target = entry.link_target or ""
            if target.startswith("/"):
                errors.append(ManifestError(file=file, field="source",
                                            reason=f"symlink {entry.path!r} has an absolute target"))
            elif _resolve_link(links, path.split("/")[:-1], target) is None:
                errors.append(ManifestError(file=file, field="source",
                                            reason=f"symlink {entry.path!r} points outside the source folder"))
    if spec.method in ("docker", "swarm"):
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


# --------------------------------------------------------------------------- releases


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def compute_release(spec: ServiceSpec, host: HostSpec, source: list[Entry]) -> Release:
    """Per-input digests (source, image, env, port, health, host) and the id over all of them.

    Env values only enter as a digest; the commit does not enter at all, so an unrelated commit keeps
    the id. Secret values are not known here: the daemon adds their keyed digest (`Release.with_input`). Only the settings of the chosen method count (editing the systemd block of a docker
    service changes nothing that runs).
    """
    prefix = len(spec.source) + 1
    image: dict[str, Any] = {"method": spec.method}
    if spec.method in ("docker", "swarm"):
        image["docker"] = spec.docker.model_dump(exclude={"container_port"})  # ports count under "port"
    else:
        image["systemd"] = spec.systemd.model_dump()
    inputs = {
        "source": _digest([[e.path[prefix:], e.mode, e.sha] for e in source]),
        "image": _digest(image),
        "env": _digest(spec.env),
        "port": _digest([spec.port, spec.container_port if spec.method in ("docker", "swarm") else None]),
        "health": _digest(spec.health.model_dump()),
        "host": _digest({"name": host.name, "base_dir": host.base_dir}),
    }
    if host.ingress != "none":  # behind a proxy an instance listens elsewhere: a new release (none: ids unchanged)
        inputs["ingress"] = _digest(host.ingress)
    if spec.method == "swarm":  # how the cluster runs it: a change updates the service without a rebuild
        inputs["swarm"] = _digest({"cluster": host.manages.model_dump() if host.manages else None,
                                   "mode": spec.mode, "replicas": spec.swarm_replicas,
                                   "placement": spec.placement.model_dump(), "rollout": spec.rollout.model_dump(),
                                   "publish_mode": spec.publish_mode})
    return Release(id=_release_id(inputs), inputs=inputs)


def _release_id(inputs: dict[str, str]) -> str:
    combined = "".join(f"{k}={v}\n" for k, v in sorted(inputs.items()))
    return hashlib.sha256(combined.encode()).hexdigest()[:12]


def expected_registry_entry(
    spec: ServiceSpec, host: HostSpec, release: Release, instance: str = "default"
) -> dict[str, Any]:
    """The Registry record a healthy deployment should have; used by plan (compare) and Register (write).

    ``instance`` names the daemon that owns the entry, so daemons sharing a Registry never prune each other's.
    """
    metadata: dict[str, Any] = {"managed_by": "deployerd", "instance": instance, "release": release.id,
                                "host": host.name, "method": spec.method}
    if spec.method == "swarm":
        metadata.update(cluster=spec.cluster, replicas="global" if spec.swarm_replicas is None else spec.swarm_replicas)
    return {
        "endpoint": spec.public_url or endpoint_url(host, spec.port),
        "status": "active",
        "metadata": metadata,
    }


def endpoint_url(host: HostSpec, port: int) -> str:
    """Where a service on ``host`` answers, as the Registry and the API advertise it (IPv6 in brackets)."""
    return f"http://{_url_host(host.public_address or host.address)}:{port}"


def _url_host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


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


def load_desired(tree: Tree, revision: str) -> DesiredState:
    """Validate the tree; a broken manifest fails that service alone, a broken hosts.yaml fails all."""
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
                raise _Invalid([ManifestError(file=file, reason="must be a regular file (not a symlink or special file)")])
            _check_manifest_size(files[0])
            spec = _load_service(tree, file, stem, clusters_of(hosts) if hosts_ok else None)
            if hosts_ok and spec.host not in hosts:
                raise _Invalid([ManifestError(file=file, field="host", reason=f"unknown host {spec.host!r} (not in hosts.yaml)")])
            specs[stem] = (file, spec)
        except _Invalid as exc:
            errors.extend(exc.errors)
            broken.add(stem)
        except (TreeError, OSError) as exc:
            errors.append(ManifestError(file=file, reason=str(exc)))
            broken.add(stem)

    errors.extend(_check_unique(specs, broken))

    services: dict[str, ServiceSpec] = {}
    releases: dict[str, Release] = {}
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
            releases[stem] = compute_release(spec, hosts[spec.host], source)
        else:
            broken.add(stem)
    if not hosts_ok:
        broken.update(specs)
    return DesiredState(revision=revision, hosts=hosts, services=services, releases=releases,
                        errors=errors, broken=broken, complete=hosts_ok)


def _check_unique(specs: dict[str, tuple[str, ServiceSpec]], broken: set[str]) -> list[ManifestError]:
    """Ports per host and droplet ids must be unique; both colliding services are broken (neither wins)."""
    errors: list[ManifestError] = []
    ports: dict[tuple[str, int], list[str]] = {}
    ids: dict[int, list[str]] = {}
    for stem, (_, spec) in specs.items():
        ports.setdefault((spec.host, spec.port), []).append(stem)
        if spec.droplet_id is not None:
            ids.setdefault(spec.droplet_id, []).append(stem)
    for (host, port), names in ports.items():
        for name in names if len(names) > 1 else []:
            others = ", ".join(n for n in names if n != name)
            errors.append(ManifestError(file=specs[name][0], field="port",
                                        reason=f"port {port} on host {host} is also used by {others}"))
            broken.add(name)
    for did, names in ids.items():
        for name in names if len(names) > 1 else []:
            others = ", ".join(n for n in names if n != name)
            errors.append(ManifestError(file=specs[name][0], field="droplet_id",
                                        reason=f"droplet_id {did} is also used by {others}"))
            broken.add(name)
    return errors

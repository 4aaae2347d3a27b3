"""The schema of the desired-state repository: hosts.yaml and services/<name>.yaml as pydantic models.

Everything here is hostile input (anyone who can push to the repo writes it), so names, paths and values
are checked strictly before any of them reaches a shell, a path join or a container label: the field
validators below refuse what could, naming the reason. ``DesiredState`` is the validated result of one
revision (``desired.load_desired`` builds it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import posixpath
import re
import warnings
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
)

HOSTS_FILE = "hosts.yaml"
SERVICES_DIR = "services"

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
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


# Folders a service dir must never sit in: prune runs ``rm -rf <base_dir>/<name>`` and a service named ``ssh``
# under /etc would take /etc/ssh with it. Whole trees the OS owns, and folders that are only containers of others.
_SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc",
                 "/sys", "/run", "/var/lib/dpkg", "/var/lib/apt", "/var/lib/systemd", "/var/lib/docker", "/var/log",
                 "/var/cache", "/var/spool", "/var/mail", "/var/run", "/var/lock", "/snap", "/lost+found")
_SYSTEM_DIRS = ("/", "/var", "/var/lib", "/var/tmp", "/var/opt", "/var/local", "/var/www", "/root", "/home", "/tmp",
                "/opt", "/srv", "/mnt", "/media", "/usr/local")
# /usr/local/<x> is the admin's own, except the standard folders the OS and packages put things in
_USR_LOCAL_STANDARD = {"bin", "sbin", "lib", "lib64", "include", "share", "etc", "src", "games", "man", "libexec"}


def system_dir_reason(path: str) -> str | None:
    """Why a normalised absolute path must not be a base_dir (None: fine)."""
    if path in _SYSTEM_DIRS:
        return f"{path} is a system directory; use a folder of its own, e.g. /opt/deployerd/services"
    parts = path.split("/")
    if path.startswith("/usr/local/") and parts[3] not in _USR_LOCAL_STANDARD:
        return None
    for tree in _SYSTEM_TREES:
        if path == tree:
            return f"{path} is a system directory; use a folder of its own, e.g. /opt/deployerd/services"
        if path.startswith(tree + "/"):
            return (f"{path} is inside the system directory {tree}; use a folder of its own, "
                    "e.g. /opt/deployerd/services")
    return None


def _base_dir(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    if not _SAFE_PATH.fullmatch(v):
        raise ValueError("may contain only letters, digits and . _ / -")
    norm = posixpath.normpath(v)
    norm = "/" if norm.startswith("//") and norm.strip("/") == "" else norm  # POSIX keeps a leading '//'
    norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise ValueError("must not be the root directory")
    reason = system_dir_reason(norm)
    if reason:
        raise ValueError(reason)
    if ".." in v.split("/"):
        raise ValueError(f"must not contain '..' (it means {norm})")
    return norm


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
    """A Docker Swarm (hosts.yaml ``clusters``), driven through its manager's engine: the manager builds each
    image once and pushes it to the cluster's image registry, from which every node pulls."""

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
    tags: Annotated[list[DnsLabel], Field(max_length=50)] = Field(default_factory=list)  # manifests' hosts: {tag: x}
    # Set from hosts.yaml ``clusters`` (never a host field there): the Swarm this host manages, so its swarm
    # runtime reads the cluster's services and a past release's record still knows the cluster's registry.
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


# {host}: 0.0.0.0, or 127.0.0.1 behind the host's ingress proxy (where {port} is the release's private port)
DEFAULT_COMMAND = "uvicorn app.main:app --host {host} --port {port}"
DEFAULT_COMMAND_BEFORE = "uvicorn app.main:app --host 0.0.0.0 --port {port}"  # its spelling before {host}


class SystemdSpec(_Model):
    """Run settings for ``method: systemd`` (a Python app run by a unit file)."""

    command: Annotated[str, AfterValidator(_one_line), Field(min_length=1, max_length=4096)] = DEFAULT_COMMAND
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


def _batch(v: Any) -> int | str:
    """Hosts per wave: a whole number from 1, or "N%" (1 to 100) of the hosts placed."""
    if isinstance(v, int) and not isinstance(v, bool):
        if not 1 <= v <= 1000:
            raise ValueError("must be greater than or equal to 1 (and at most 1000)")
        return v
    if isinstance(v, str) and v.endswith("%") and v[:-1].isdigit() and 1 <= int(v[:-1]) <= 100:
        return v
    raise ValueError("must be a number of hosts (1 or more) or a percentage of them, '1%' to '100%'")


SWARM_ROLLOUT = ("parallelism", "delay_s", "order", "failure_action", "monitor_s", "max_failure_ratio")
FLEET_ROLLOUT = ("canary", "batch", "pause_s", "max_failed_hosts")


class RolloutSpec(_Model):
    """How an update rolls out. ``method: swarm``: Swarm's update_config (its rollback_config pauses on failure),
    the fields of SWARM_ROLLOUT. A docker/systemd service on several hosts: waves of hosts, FLEET_ROLLOUT."""

    parallelism: Annotated[int, Field(ge=0, le=1000)] = 1  # tasks updated at once (0: all)
    delay_s: float = Field(default=0.0, ge=0, le=3600)  # between two batches
    order: Literal["start-first", "stop-first"] = "start-first"
    failure_action: Literal["rollback", "pause"] = "rollback"
    monitor_s: float = Field(default=5.0, gt=0, le=3600)  # how long a new task is watched for failure
    max_failure_ratio: float = Field(default=0.0, ge=0, le=1)
    canary: Annotated[int, Field(ge=0, le=1000)] = 1  # hosts deployed first, alone (0: no canary wave)
    # hosts per wave after the canary: a number, or "N%" of the hosts placed (rounded up, at least 1)
    batch: Annotated[int | str, PlainValidator(_batch)] = 1
    pause_s: float = Field(default=0.0, ge=0, le=3600)  # between two waves
    max_failed_hosts: Annotated[int, Field(ge=0, le=1000)] = 0  # more hosts failing end (and roll back) the rollout


# "register" (a manifest field) shadows ABCMeta.register on the class; harmless, so the warning is muted
warnings.filterwarnings("ignore", message='Field name "register" in "ServiceSpec" shadows', category=UserWarning)


class HostTag(_Model):
    """``hosts: {tag: web}``: every host of hosts.yaml with that tag, in its order."""

    tag: DnsLabel


class ServiceSpec(_Model):
    """One service manifest, services/<name>.yaml."""

    name: DnsLabel
    droplet_id: Annotated[int, Field(ge=1)] | None = None
    # method swarm: the cluster's manager (filled in from hosts.yaml); a fleet (``hosts``): its first host
    host: DnsLabel
    # several hosts (docker, systemd): names of hosts.yaml, or a tag; resolved into ``fleet`` when loaded
    hosts: Annotated[list[DnsLabel], Field(min_length=1, max_length=500)] | HostTag | None = None
    # Set from ``hosts`` by the loader (never a manifest field): the hosts, in manifest (a tag: hosts.yaml) order
    fleet: list[DnsLabel] = Field(default_factory=list)
    method: Literal["docker", "systemd", "swarm"] = "docker"
    port: Port
    source: RelPath
    cluster: DnsLabel | None = None  # method swarm: a cluster of hosts.yaml
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
    # behind an ingress: how long requests in flight on the old release may finish
    drain_timeout_s: float = Field(default=30.0, ge=0, le=600)
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
    def placed_on(self) -> list[str]:
        """Every host an instance of the service runs on: its fleet, or its one host."""
        return list(self.fleet) or [self.host]

    @property
    def container_port(self) -> int:
        return self.docker.container_port or self.port

    @property
    def builds_image(self) -> bool:
        """Built from a Dockerfile (``method: docker`` and ``method: swarm``)."""
        return self.method != "systemd"

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
    # inputs kept out of the id: a fleet's per-host settings, so its release id is the same on every host
    per_host: tuple[str, ...] = ()

    def with_input(self, name: str, digest: str) -> Release:
        """This release with one more input (the daemon adds ``secrets``, whose values git never holds)."""
        inputs = {**self.inputs, name: digest}
        return Release(id=release_id(inputs, self.per_host), inputs=inputs, per_host=self.per_host)


def release_id(inputs: dict[str, str], per_host: tuple[str, ...] = ()) -> str:
    """The id over a release's input digests (all but those named ``per_host``)."""
    combined = "".join(f"{k}={v}\n" for k, v in sorted(inputs.items()) if k not in per_host)
    return hashlib.sha256(combined.encode()).hexdigest()[:12]


class DesiredState(BaseModel):
    """The validated desired state at one revision.

    ``broken`` holds the file stems of manifests that failed validation: their running release is left
    as it is. ``complete`` is False when hosts.yaml itself is broken: then nothing may be pruned.
    """

    revision: str
    hosts: dict[str, HostSpec] = Field(default_factory=dict)
    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    releases: dict[str, Release] = Field(default_factory=dict)  # a fleet: its first host's
    # service -> host -> the release it runs there: every host it is placed on (a fleet: one id, own host inputs)
    host_releases: dict[str, dict[str, Release]] = Field(default_factory=dict)
    errors: list[ManifestError] = Field(default_factory=list)
    broken: set[str] = Field(default_factory=set)
    complete: bool = True

    def release_on(self, service: str, host: str) -> Release:
        """The release ``service`` should run on ``host`` (its own host inputs when it is one of a fleet)."""
        return self.host_releases.get(service, {}).get(host) or self.releases[service]

    def errors_for(self, service: str) -> list[ManifestError]:
        """Errors of one service's manifest (or, when hosts.yaml is broken, those of hosts.yaml)."""
        mine = [e for e in self.errors if e.file in (_manifest_path(service, ".yaml"), _manifest_path(service, ".yml"))]
        return mine or [e for e in self.errors if e.file == HOSTS_FILE]


def _manifest_path(stem: str, ext: str) -> str:
    return f"{SERVICES_DIR}/{stem}{ext}"

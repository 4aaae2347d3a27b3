"""The per-host ingress proxy (HAProxy) as data: its unit, its config, its runtime commands and their answers.

Pure functions only (no I/O), tested as data. ``ingress.proxy`` runs what they return over the host's SSH
connection. Why HAProxy and not Caddy: bench/RESULTS.md ("Ingress proxy choice"): a switch through HAProxy's
runtime API changes one backend's servers without touching any client connection (0 failed requests over
the measured switches, keep-alive or not), where every Caddy config change, even a PATCH of one upstream, is a
reload that closes idle keep-alive connections (13 of 651 requests failed over 20 switches); HAProxy also
reports the requests still in flight on the old server, so a drain ends when they finish, not after a guess.

Per service on the host, a frontend ``fe_<name>`` binds the public port, and a backend ``be_<name>`` holds one
server per release, named by the release id and added at runtime (``add server``): the response header
``X-Deployerd-Upstream`` names the release that answered, which is how a deploy proves the front door reaches
the new release before it registers. The config file holds only each service's active server, so a restarted
proxy comes back serving what served before it died.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

UNIT_NAME = "deployerd-ingress.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
CONFIG_DIR = "/etc/deployerd-ingress"
CONFIG_PATH = f"{CONFIG_DIR}/haproxy.cfg"
RUN_DIR = "/run/deployerd-ingress"
ADMIN_SOCKET = f"{RUN_DIR}/admin.sock"
HAPROXY = "/usr/sbin/haproxy"
UPSTREAM_HEADER = "X-Deployerd-Upstream"
PRIVATE_PORTS = range(20000, 30000)  # instances behind the proxy listen on 127.0.0.1 in this range
# The host's proxy lock: daemons sharing a host each read, change and rewrite the one config, so each change is
# made holding it (flock on a file in /run/lock: the kernel lets go when its holder exits, whatever ended it).
LOCK_PATH = "/run/lock/deployerd-ingress.lock"
LOCK_WAIT_S = 60
# The holder: it says "held" once flock has the lock, then reads its stdin until the SSH channel closes (the
# change done, the daemon dead or its connection lost). The path and the wait are its arguments, never script;
# `command exec` keeps a lock file that cannot be opened from ending the shell before it says so.
_LOCK_SCRIPT = ('command exec 9>>"$1" || { echo "cannot open it"; exit 1; }; flock -w "$2" 9; rc=$?; case $rc in '
                '0) ;; 1) echo busy; exit 1;; *) echo "flock exited with status $rc"; exit 1;; esac; '
                'echo held; exec cat >/dev/null')

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

UNIT = f"""# Written by deployerd: the host's ingress proxy, which binds the public ports of deployerd's services.
[Unit]
Description=deployerd ingress (HAProxy)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
Environment=CONFIG={CONFIG_PATH} PIDFILE={RUN_DIR}/haproxy.pid
ExecStartPre={HAPROXY} -f $CONFIG -c -q
ExecStart={HAPROXY} -Ws -f $CONFIG -p $PIDFILE
ExecReload={HAPROXY} -f $CONFIG -c -q
ExecReload=/bin/kill -USR2 $MAINPID
KillMode=mixed
Restart=always
RestartSec=1s
RuntimeDirectory=deployerd-ingress
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes

[Install]
WantedBy=multi-user.target
"""


def lock_command(wait_s: int = LOCK_WAIT_S) -> list[str]:
    """The argv that holds the host's proxy lock for as long as it runs (its first line: held, busy, or why not)."""
    return ["sh", "-c", _LOCK_SCRIPT, "deployerd-ingress-lock", LOCK_PATH, str(wait_s)]


def proxy_id(name: str) -> str:
    """A name usable as an HAProxy proxy or server id (service qualified names and release ids are)."""
    if not _ID.match(name):
        raise ValueError(f"{name!r} cannot name an HAProxy frontend, backend or server")
    return name


@dataclass(frozen=True)
class Route:
    """One service behind the proxy: its public port and the release (with its private port) serving it."""

    service: str  # the qualified name on the host
    port: int
    release: str | None = None  # None: no instance yet (the frontend answers 503)
    upstream_port: int | None = None


def render_config(routes: list[Route], drain_timeout_s: float = 30.0) -> str:
    """The whole config file: global settings, then a frontend and a backend per route (sorted by service)."""
    hard_stop = int(drain_timeout_s) + 30  # a reload's old worker finishes its requests, then goes
    out = [
        "# Written by deployerd; every change is rewritten. Servers are added and drained at runtime.",
        "global",
        f"    stats socket {ADMIN_SOCKET} mode 600 level admin expose-fd listeners",
        # One event loop: HAProxy starts one thread per CPU by default, and on a small host every request's
        # wake-up then contends with the services for those CPUs (bench/RESULTS.md, "What the proxy adds":
        # fewer context switches and run-queue waits per request with one thread; a host's ingress needs no more)
        "    nbthread 1",
        "    stats timeout 30s",
        f"    hard-stop-after {hard_stop}s",
        "",
        "defaults",
        "    mode http",
        "    option redispatch",  # a connection refused by one server is retried on another one
        "    retries 3",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 600s",
        "    timeout http-keep-alive 10s",
    ]
    for r in sorted(routes, key=lambda r: r.service):
        name = proxy_id(r.service)
        out += ["", f"frontend fe_{name}", f"    bind :{r.port}", f"    default_backend be_{name}",
                f"    http-response set-header {UPSTREAM_HEADER} %[srv_name]",
                "", f"backend be_{name}"]
        if r.release is not None and r.upstream_port is not None:
            out.append(f"    server {proxy_id(r.release)} 127.0.0.1:{r.upstream_port}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Server:
    """One server of a backend as ``show servers state`` reports it."""

    backend: str
    name: str  # the release id
    port: int
    admin_state: int  # bit field: 0x01 forced maintenance, 0x08 forced drain

    @property
    def active(self) -> bool:
        """Takes new requests (neither in maintenance nor draining)."""
        return self.admin_state & 0x3F == 0


@dataclass
class ProxyState:
    """What the proxy serves: per service (qualified name) its servers; read in one runtime API call."""

    servers: dict[str, list[Server]] = field(default_factory=dict)

    def active(self, service: str) -> Server | None:
        return next((s for s in self.servers.get(service, []) if s.active), None)


def parse_servers_state(text: str) -> ProxyState:
    """``show servers state`` output (a version line, a header, one line per server) -> ProxyState."""
    state = ProxyState()
    for line in text.splitlines():
        f = line.split()
        if len(f) < 19 or line.startswith("#") or not f[0].isdigit():
            continue
        backend = f[1]
        if not backend.startswith("be_"):
            continue
        state.servers.setdefault(backend[3:], []).append(
            Server(backend=backend, name=f[3], port=int(f[18]), admin_state=int(f[6])))
    return state


def parse_in_flight(stat_csv: str, service: str, release: str) -> int | None:
    """Requests in flight (``scur``) on one server, from ``show stat``; None when it is not there."""
    for line in stat_csv.splitlines():
        f = line.split(",")
        if len(f) > 4 and f[0] == f"be_{service}" and f[1] == release:
            return int(f[4] or 0)
    return None


def frontends_open(stat_csv: str) -> set[str]:
    """Services whose frontend is bound (status OPEN) in ``show stat``."""
    found = set()
    for line in stat_csv.splitlines():
        f = line.split(",")
        if len(f) > 17 and f[1] == "FRONTEND" and f[0].startswith("fe_") and f[17] == "OPEN":
            found.add(f[0][3:])
    return found


def switch_command(service: str, release: str, port: int, others: list[str]) -> str:
    """One runtime API line: add the new server (created in maintenance), enable it, drain the others.
    HAProxy runs the line's commands back to back, so no request ever finds the backend without a server."""
    be, srv = f"be_{proxy_id(service)}", proxy_id(release)
    parts = [f"add server {be}/{srv} 127.0.0.1:{port}", f"enable server {be}/{srv}"]
    parts += [f"set server {be}/{proxy_id(o)} state drain" for o in others if o != release]
    return "; ".join(parts)


def enable_command(service: str, release: str, others: list[str]) -> str:
    """The same switch to a server the backend already has (a rollback before the old one was removed)."""
    be, srv = f"be_{proxy_id(service)}", proxy_id(release)
    parts = [f"set server {be}/{srv} state ready"]
    parts += [f"set server {be}/{proxy_id(o)} state drain" for o in others if o != release]
    return "; ".join(parts)


def remove_command(service: str, release: str) -> str:
    """Take a drained server out: maintenance, cut what is left (past the drain timeout), delete."""
    be, srv = f"be_{proxy_id(service)}", proxy_id(release)
    return f"set server {be}/{srv} state maint; shutdown sessions server {be}/{srv}; del server {be}/{srv}"


_OK_ANSWERS = ("New server registered.", "Server deleted.")


def runtime_errors(answer: str) -> list[str]:
    """The error lines of a runtime API answer (commands that succeed print nothing or a known line)."""
    return [ln.strip() for ln in answer.splitlines() if ln.strip() and ln.strip() not in _OK_ANSWERS]


def allocate_port(used: set[int], service: str) -> int:
    """A private port for a new release: the first free one in PRIVATE_PORTS, starting at a point derived from
    the service's name (so services rarely compete for the same ports), skipping every port in ``used``."""
    span = len(PRIVATE_PORTS)
    start = sum(service.encode()) * 7 % span
    for i in range(span):
        port = PRIVATE_PORTS[(start + i) % span]
        if port not in used:
            return port
    raise ValueError(f"no free private port left for {service} in {PRIVATE_PORTS.start}-{PRIVATE_PORTS.stop - 1}")

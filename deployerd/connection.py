"""The SSH connection seam: one asyncssh connection per host, kept and reused across reconciles.

Why one connection: the seed deployer opened a new SSH session per phase and accepted any host key;
here every command, SFTP transfer and tunnel (Docker socket, health-check port) shares one verified
connection per host, and the pool counts round trips so a benchmark can hold us to that.

Exception tree (library errors are translated here, at the boundary)::

    HostUnreachable            could not reach or keep a session with the host (transient: retry)
     +-- HostKeyRejected       host key did not verify against known_hosts (terminal)
     +-- AuthenticationRejected our key was refused or unreadable (terminal)
    CommandError               the command ran and failed (non-zero exit)
     +-- CommandTimeout        it did not finish within its timeout
     +-- RemoteFileError       an SFTP operation failed (missing file, permission, ...)

Commands are argv lists joined with :func:`shlex.join`; never interpolated shell strings. Secrets go
through ``input`` (stdin) or SFTP, never the command line. Nothing here logs argv beyond ``argv[0]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import posixpath
import secrets
import shlex
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import asyncssh

__all__ = [
    "AuthenticationRejected",
    "CommandError",
    "CommandTimeout",
    "Completed",
    "Connection",
    "ConnectionPool",
    "HostAddress",
    "HostKeyRejected",
    "HostStats",
    "HostUnreachable",
    "RemoteFileError",
]

REMOTE_DOCKER_SOCKET = "/var/run/docker.sock"

# asyncssh logs every full command line at INFO; keep it to warnings so argv never reaches the logs.
logging.getLogger("asyncssh").setLevel(logging.WARNING)
_STDERR_TAIL = 400  # characters of stderr kept in a CommandError message
_CHANNEL_RETRY_DELAYS = (0.05, 0.2, 0.5)  # seconds between attempts when sshd refuses a channel
_CHUNK = 256 * 1024  # local file read size for put_file (read off the event loop)


# --------------------------------------------------------------------------------------------- errors


class HostUnreachable(Exception):
    """The host could not be reached or the session broke (refused, timeout, reset, DNS).

    ``transient`` tells the caller whether retrying later can help.
    """

    transient = True

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"host {host} unreachable: {reason}")


class HostKeyRejected(HostUnreachable):
    """The host presented a key that known_hosts does not vouch for: never connect, never retry blindly."""

    transient = False

    def __init__(self, host: str, known_hosts: str, detail: str = "") -> None:
        self.known_hosts = known_hosts
        HostUnreachable.__init__(self, host, "host key rejected")
        msg = f"host key for {host} did not verify against {known_hosts}"
        self.args = (f"{msg} ({detail})" if detail else msg,)


class AuthenticationRejected(HostUnreachable):
    """The host refused our key, or the key file could not be read; retrying will not help."""

    transient = False


class CommandError(Exception):
    """The command ran on the host and failed. Only argv[0] is named: later args may be sensitive."""

    def __init__(self, host: str, command: str, exit_status: int, stderr: str) -> None:
        self.host = host
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr
        tail = stderr.strip()[-_STDERR_TAIL:]
        super().__init__(f"{host}: {command} exited {exit_status}" + (f": {tail}" if tail else ""))


class CommandTimeout(CommandError):
    """The command did not finish in time; its channel was closed (the connection itself may be fine)."""

    def __init__(self, host: str, command: str, timeout: float, stderr: str = "") -> None:
        super().__init__(host, command, -1, stderr)
        self.timeout = timeout
        self.args = (f"{host}: {command} timed out after {timeout:g}s",)


class RemoteFileError(CommandError):
    """An SFTP operation failed on the host (``code`` is the SFTP status, e.g. 2 = no such file)."""

    def __init__(self, host: str, op: str, path: str, code: int, reason: str) -> None:
        super().__init__(host, f"sftp {op}", code, reason)
        self.path = path
        self.code = code
        self.args = (f"{host}: sftp {op} {path}: {reason}",)

    @property
    def not_found(self) -> bool:
        """True when the path does not exist (lets callers treat "absent" as a fact, not a failure)."""
        return self.code in (asyncssh.FX_NO_SUCH_FILE, asyncssh.FX_NO_SUCH_PATH)


def _translate(host: str, exc: BaseException) -> HostUnreachable:
    """Map asyncssh/OSError connection failures to HostUnreachable with a short, secret-free reason."""
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthenticationRejected(host, f"authentication refused: {exc.reason}")
    if isinstance(exc, asyncssh.DisconnectError):
        return HostUnreachable(host, f"disconnected: {exc.reason}")
    if isinstance(exc, asyncssh.ChannelOpenError):
        return HostUnreachable(host, f"channel refused: {exc.reason}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return HostUnreachable(host, "timed out")
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(host, f"DNS: {exc.strerror or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return HostUnreachable(host, "connection refused")
    if isinstance(exc, ConnectionResetError):
        return HostUnreachable(host, "connection reset")
    if isinstance(exc, OSError):
        return HostUnreachable(host, exc.strerror or type(exc).__name__)
    return HostUnreachable(host, type(exc).__name__)


_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    asyncssh.sftp.SFTPConnectionLost,
    asyncssh.sftp.SFTPNoConnection,
)


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class HostAddress:
    """Where and how to reach one host. Frozen and comparable: a changed address means reconnect."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key_path: str = ""
    known_hosts: str = ""

    def __post_init__(self) -> None:
        if not self.known_hosts:
            # Refusing here makes "accept any host key" impossible to configure by omission.
            raise ValueError(f"host {self.name}: a known_hosts file is required")
        if not self.key_path:
            raise ValueError(f"host {self.name}: a key_path is required")


@dataclass(frozen=True)
class Completed:
    """Result of one remote command. ``exit_status`` is negative (-signal) if it was killed by a signal."""

    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass
class HostStats:
    """Counters per host. ``round_trips`` is what a benchmark compares across reconciles."""

    connects: int = 0
    commands: int = 0
    sftp_ops: int = 0  # one per public SFTP call (put_bytes, put_file, read_bytes, makedirs, link, ...)
    api_requests: int = 0  # Docker API requests through the forwarded socket (counted by the Docker runtime)
    forwards: int = 0  # tunnels opened: the Docker socket once per connection, a health port once per wait
    failures: int = 0  # connect failures and connection-level errors

    @property
    def round_trips(self) -> int:
        return self.commands + self.sftp_ops + self.api_requests


# ------------------------------------------------------------------------------------------ connection


class Connection:
    """One live SSH connection to one host, with its cached SFTP client and tunnels."""

    def __init__(
        self,
        host: HostAddress,
        conn: asyncssh.SSHClientConnection,
        stats: HostStats | None = None,
        *,
        max_sessions: int = 6,
    ) -> None:
        self.host = host
        self._conn = conn
        self.stats = stats if stats is not None else HostStats()
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._forward_lock = asyncio.Lock()
        self._tmpdir: str | None = None
        self._sockets: dict[str, str] = {}  # remote unix socket -> its local forward
        self._listeners: list[asyncssh.SSHListener] = []
        # OpenSSH refuses more than MaxSessions (default 10) session channels at once; queue instead,
        # leaving room for the SFTP channel and for slots sshd has not freed yet.
        self._sessions = asyncio.Semaphore(max_sessions)
        self._closed = False
        self._broken = False  # a connection-level error was seen: the pool replaces us on next get()

    @classmethod
    async def open(
        cls,
        host: HostAddress,
        *,
        stats: HostStats | None = None,
        connect_timeout: float = 15.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
        max_sessions: int = 6,
    ) -> Connection:
        """Connect, verifying the host key against ``host.known_hosts``; raise HostUnreachable & co."""
        stats = stats if stats is not None else HostStats()
        try:
            # Read files off the event loop; asyncssh would otherwise read them synchronously.
            known = await asyncio.to_thread(asyncssh.read_known_hosts, host.known_hosts)
        except (OSError, ValueError) as exc:
            stats.failures += 1
            raise HostKeyRejected(host.name, host.known_hosts, f"cannot read it: {type(exc).__name__}") from None
        try:
            key = await asyncio.to_thread(asyncssh.read_private_key, host.key_path)
        except (OSError, asyncssh.KeyImportError) as exc:
            stats.failures += 1
            raise AuthenticationRejected(
                host.name, f"cannot read key file {host.key_path}: {type(exc).__name__}"
            ) from None
        try:
            conn = await asyncssh.connect(
                host.address,
                host.port,
                username=host.user,
                client_keys=[key],
                known_hosts=known,
                agent_path=None,
                config=[],  # no ~/.ssh/config: behaviour must not depend on the daemon user's dotfiles
                connect_timeout=connect_timeout,
                keepalive_interval=keepalive_interval,
                keepalive_count_max=keepalive_count_max,
            )
        except asyncssh.HostKeyNotVerifiable:
            stats.failures += 1
            raise HostKeyRejected(host.name, host.known_hosts) from None
        except _CONNECTION_ERRORS as exc:
            stats.failures += 1
            raise _translate(host.name, exc) from None
        stats.connects += 1
        return cls(host, conn, stats, max_sessions=max_sessions)

    @property
    def is_closed(self) -> bool:
        """True once closed by us or lost (peer gone, keepalive failed): the pool then reconnects."""
        return self._closed or self._broken or self._conn.is_closed()

    async def wait_closed(self) -> None:
        """Return once the underlying connection has closed, by us or by the peer."""
        await self._conn.wait_closed()

    def _lost(self, exc: BaseException) -> HostUnreachable:
        """Translate a connection-level failure; a refused channel on a live connection is not one."""
        self.stats.failures += 1
        if self._conn.is_closed():
            self._broken = True
            return HostUnreachable(self.host.name, "connection lost")
        if not isinstance(exc, asyncssh.ChannelOpenError):
            self._broken = True
        return _translate(self.host.name, exc)

    # -- commands

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = 60,
    ) -> Completed:
        """Run ``argv`` on the host (quoted with shlex.join); raise CommandError on failure if ``check``.

        At most ``max_sessions`` commands run at once per connection (others wait their turn);
        ``timeout`` counts from the command's start, not from the wait.
        """
        if isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv must be a non-empty sequence of strings, not a shell string")
        command = shlex.join(argv)
        self.stats.commands += 1
        try:
            async with self._sessions:
                result = await self._run_channel(command, input, timeout)
        except asyncssh.TimeoutError as exc:
            raise CommandTimeout(self.host.name, argv[0], timeout or 0, _decode(exc.stderr)) from None
        except _CONNECTION_ERRORS as exc:
            raise self._lost(exc) from None
        if result.returncode is None:
            # OpenSSH always reports an exit status or signal; none means the session broke mid-command.
            self._broken = True
            self.stats.failures += 1
            raise HostUnreachable(self.host.name, "session ended without an exit status")
        status = result.returncode
        done = Completed(status, _decode(result.stdout), _decode(result.stderr))
        if check and status != 0:
            raise CommandError(self.host.name, argv[0], status, done.stderr)
        return done

    async def _run_channel(
        self, command: str, input: bytes | None, timeout: float | None
    ) -> asyncssh.SSHCompletedProcess:
        """Run one command, retrying a refused channel on a live connection a few times.

        sshd frees a session slot a moment after the client saw it end, so a burst can briefly exceed
        MaxSessions even below our own limit; a short bounded backoff absorbs that.
        """
        for delay in _CHANNEL_RETRY_DELAYS:
            try:
                return await self._conn.run(command, input=input, check=False, timeout=timeout, encoding=None)
            except asyncssh.ChannelOpenError:
                if self._conn.is_closed():
                    raise
            await asyncio.sleep(delay)
        return await self._conn.run(command, input=input, check=False, timeout=timeout, encoding=None)

    # -- SFTP

    async def sftp(self) -> asyncssh.SFTPClient:
        """The connection's SFTP client, started once and reused (a new channel per call is a round trip)."""
        async with self._sftp_lock:
            if self._sftp is None:
                try:
                    self._sftp = await self._conn.start_sftp_client()
                except (*_CONNECTION_ERRORS, asyncssh.SFTPError) as exc:
                    raise self._lost(exc) from None
            return self._sftp

    def _sftp_error(self, op: str, path: str, exc: BaseException) -> Exception:
        if isinstance(exc, _CONNECTION_ERRORS):
            self._sftp = None  # the subsystem channel is gone; start a new one next time
            return self._lost(exc)
        assert isinstance(exc, asyncssh.SFTPError)
        return RemoteFileError(self.host.name, op, path, exc.code, exc.reason)

    async def _put_atomic(self, path: str, mode: int, write: Callable[[Any], Awaitable[Any]]) -> None:
        """Write through ``write(file)`` to a 0600 temp name beside ``path``, chmod, then rename over it:
        readers never see a partial file, and a secret is never readable while it is being written."""
        self.stats.sftp_ops += 1
        sftp = await self.sftp()
        tmp = _temp_name(path)
        try:
            async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=0o600), encoding=None) as f:
                await write(f)
                await f.chmod(mode)
            await sftp.posix_rename(tmp, path)
        except (*_CONNECTION_ERRORS, asyncssh.SFTPError) as exc:
            await self._discard(sftp, tmp)
            raise self._sftp_error("put", path, exc) from None

    async def put_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` atomically with ``mode``."""
        await self._put_atomic(path, mode, lambda f: f.write(data))

    async def put_file(self, local: str | os.PathLike[str], remote: str, mode: int = 0o644) -> None:
        """Upload a local file atomically (like put_bytes), reading it in chunks off the event loop."""
        src = await asyncio.to_thread(open, local, "rb")

        async def copy(f: Any) -> None:
            while chunk := await asyncio.to_thread(src.read, _CHUNK):
                await f.write(chunk)

        try:
            await self._put_atomic(remote, mode, copy)
        finally:
            await asyncio.to_thread(src.close)

    async def read_bytes(self, path: str) -> bytes:
        """Read a whole remote file; RemoteFileError(.not_found) if it is absent."""
        self.stats.sftp_ops += 1
        sftp = await self.sftp()
        try:
            async with sftp.open(path, "rb", encoding=None) as f:
                data = await f.read()
        except (*_CONNECTION_ERRORS, asyncssh.SFTPError) as exc:
            raise self._sftp_error("read", path, exc) from None
        assert isinstance(data, bytes)
        return data

    async def makedirs(self, path: str) -> None:
        """Create a remote directory and its parents; existing ones are fine."""
        self.stats.sftp_ops += 1
        sftp = await self.sftp()
        try:
            await sftp.makedirs(path, exist_ok=True)
        except (*_CONNECTION_ERRORS, asyncssh.SFTPError) as exc:
            raise self._sftp_error("mkdir", path, exc) from None

    async def link(self, src: str, dst: str) -> None:
        """Hard-link ``src`` as ``dst``; fails if ``dst`` exists (an exclusive create with full content)."""
        await self._sftp_call("link", dst, lambda sftp: sftp.link(src, dst))

    async def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` atomically (POSIX rename: an existing ``dst`` is replaced)."""
        await self._sftp_call("rename", src, lambda sftp: sftp.posix_rename(src, dst))

    async def remove(self, path: str) -> None:
        """Remove one file; RemoteFileError(.not_found) if it is absent."""
        await self._sftp_call("remove", path, lambda sftp: sftp.remove(path))

    async def _sftp_call(self, op: str, path: str, call: Callable[[asyncssh.SFTPClient], Awaitable[Any]]) -> None:
        self.stats.sftp_ops += 1
        sftp = await self.sftp()
        try:
            await call(sftp)
        except (*_CONNECTION_ERRORS, asyncssh.SFTPError) as exc:
            raise self._sftp_error(op, path, exc) from None

    async def _discard(self, sftp: asyncssh.SFTPClient, tmp: str) -> None:
        """Best effort: do not leave a half-written temp file behind (the target was never touched)."""
        try:
            await sftp.remove(tmp)
        except (*_CONNECTION_ERRORS, asyncssh.SFTPError):
            pass

    # -- forwarding

    async def docker_socket(self) -> str:
        """Local unix socket path forwarded to the host's Docker socket (private 0700 dir, cached)."""
        return await self.forwarded_socket(REMOTE_DOCKER_SOCKET)

    async def forwarded_socket(self, remote_path: str) -> str:
        """A local unix socket forwarded to the host's unix socket ``remote_path`` (the Docker engine, the
        ingress proxy's admin API), in a private 0700 dir; one per remote path, kept with the connection."""
        async with self._forward_lock:
            path = self._sockets.get(remote_path)
            if path is None:
                if self._tmpdir is None:
                    self._tmpdir = await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{_SOCKET_DIR_PREFIX}{os.getpid()}-")
                    await asyncio.to_thread(os.chmod, self._tmpdir, 0o700)
                path = os.path.join(self._tmpdir, f"{len(self._sockets)}-{posixpath.basename(remote_path)}")
                try:
                    listener = await self._conn.forward_local_path(path, remote_path)
                except _CONNECTION_ERRORS as exc:
                    raise self._lost(exc) from None
                self._listeners.append(listener)
                self.stats.forwards += 1
                self._sockets[remote_path] = path
            return path

    @contextlib.asynccontextmanager
    async def forwarded_port(self, remote_port: int, remote_host: str = "127.0.0.1") -> AsyncIterator[int]:
        """A local port on 127.0.0.1 tunnelled to ``remote_host:remote_port`` as seen from the host, open for
        the block (one health wait): a daemon that deploys hundreds of services keeps no listener per port."""
        try:
            listener = await self._conn.forward_local_port("127.0.0.1", 0, remote_host, remote_port)
        except _CONNECTION_ERRORS as exc:
            raise self._lost(exc) from None
        self.stats.forwards += 1
        self._listeners.append(listener)
        try:
            yield listener.get_port()
        finally:
            listener.close()
            if listener in self._listeners:  # close() may have cleared them
                self._listeners.remove(listener)

    # -- lifecycle

    async def close(self) -> None:
        """Close tunnels, SFTP and the connection, and remove the private socket dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        self._sockets.clear()
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        self._conn.close()
        try:
            await self._conn.wait_closed()
        except (*_CONNECTION_ERRORS, asyncssh.Error):
            pass
        if self._tmpdir is not None:
            await asyncio.to_thread(shutil.rmtree, self._tmpdir, True)
            self._tmpdir = None


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


_SOCKET_DIR_PREFIX = "deployerd-ssh-"


def sweep_socket_dirs() -> list[str]:
    """Remove the forwarded-socket dirs (``deployerd-ssh-<pid>-*`` in the temp dir) of daemons that died
    without closing (SIGKILL); a live process's dirs stay. Blocking: run it in a thread. Returns what went."""
    base = tempfile.gettempdir()
    gone = []
    for name in os.listdir(base):
        pid = name.removeprefix(_SOCKET_DIR_PREFIX).split("-", 1)[0]
        path = os.path.join(base, name)
        if not name.startswith(_SOCKET_DIR_PREFIX) or not pid.isdigit():
            continue
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
            continue  # alive (or a reused pid: then the dir stays, which is harmless)
        except ProcessLookupError:
            pass
        except OSError:  # another user's process, or the dir just went
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


_TEMP_INFIX = ".tmp-"


def temp_name_pattern(name: str = "*") -> str:
    """The glob of ``_temp_name``'s names for files named ``name``: what a write cut short leaves behind."""
    return f".{name}{_TEMP_INFIX}*"


def _temp_name(path: str) -> str:
    """A hidden, unique sibling of ``path``: same filesystem, so the final rename is atomic."""
    p = PurePosixPath(path)
    return str(p.with_name(f".{p.name}{_TEMP_INFIX}{secrets.token_hex(6)}"))


# ------------------------------------------------------------------------------------------------ pool


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conn: Connection | None = None
    stats: HostStats = field(default_factory=HostStats)


class ConnectionPool:
    """Keeps one live Connection per host name; reconnects when it was lost or the address changed."""

    def __init__(
        self,
        *,
        connect_timeout: float = 15.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
        max_sessions: int = 6,
    ) -> None:
        self._max_sessions = max_sessions
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._keepalive_count_max = keepalive_count_max
        self._slots: dict[str, _Slot] = {}

    async def get(self, host: HostAddress) -> Connection:
        """The live connection for ``host``, connecting once even if many callers ask at the same time."""
        slot = self._slots.get(host.name)
        if slot is None:
            slot = self._slots[host.name] = _Slot()
        conn = slot.conn
        if conn is not None and conn.host == host and not conn.is_closed:
            return conn
        async with slot.lock:
            conn = slot.conn
            if conn is not None and conn.host == host and not conn.is_closed:
                return conn  # another caller connected while we waited
            if conn is not None:
                slot.conn = None
                await conn.close()
            slot.conn = await Connection.open(
                host,
                stats=slot.stats,
                connect_timeout=self._connect_timeout,
                keepalive_interval=self._keepalive_interval,
                keepalive_count_max=self._keepalive_count_max,
                max_sessions=self._max_sessions,
            )
            return slot.conn

    async def drop(self, name: str) -> None:
        """Close one host's connection (e.g. the host left the inventory); the next get() reconnects."""
        slot = self._slots.get(name)
        if slot is not None and slot.conn is not None:
            conn, slot.conn = slot.conn, None
            await conn.close()

    async def close_all(self) -> None:
        """Close every connection; the pool stays usable and its counters are kept."""
        conns = [s.conn for s in self._slots.values() if s.conn is not None]
        for slot in self._slots.values():
            slot.conn = None
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    def stats(self) -> dict[str, HostStats]:
        """A snapshot (copies) of the counters per host name, to diff before/after a reconcile."""
        return {name: dataclasses.replace(slot.stats) for name, slot in self._slots.items()}

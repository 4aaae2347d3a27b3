"""One host's SSH connection: commands, SFTP calls and tunnels over it, and the counters of each.

Every failure leaves here translated (``errors``): callers never see an asyncssh exception. Each public
command or SFTP call counts as one round trip in ``HostStats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncssh

from deployerd.connection.errors import (
    _CONNECTION_ERRORS,
    AuthenticationRejected,
    CommandError,
    CommandTimeout,
    HostKeyRejected,
    HostUnreachable,
    RemoteFileError,
    _translate,
)
from deployerd.connection.names import _SOCKET_DIR_PREFIX
from deployerd.connection.sftp import RemoteFiles

REMOTE_DOCKER_SOCKET = "/var/run/docker.sock"

# asyncssh logs every full command line at INFO; keep it to warnings so argv never reaches the logs.
logging.getLogger("asyncssh").setLevel(logging.WARNING)
_CHANNEL_RETRY_DELAYS = (0.05, 0.2, 0.5)  # seconds between attempts when sshd refuses a channel


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


class Connection(RemoteFiles):
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
    def host_key(self) -> str:
        """The SHA256 fingerprint of the host key the server presented (verified against known_hosts)."""
        key = self._conn.get_server_host_key()
        return key.get_fingerprint("sha256") if key is not None else ""

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

    @contextlib.asynccontextmanager
    async def stream(self, argv: Sequence[str]) -> AsyncIterator[AsyncIterator[str]]:
        """Run a long-lived ``argv`` on the host (a watcher) and yield its stdout lines as they come.

        Outside the command limit: it holds one session channel for as long as the block runs (sshd allows 10,
        commands take at most ``max_sessions``). Its stdin stays open: leaving the block closes the channel, and
        a helper reading stdin sees EOF and exits, so no watcher outlives its connection on the host. Lines stop
        (the iterator ends) when the command exits or the connection is lost."""
        if isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv must be a non-empty sequence of strings, not a shell string")
        self.stats.commands += 1
        try:
            process = await self._conn.create_process(shlex.join(argv), encoding="utf-8", errors="replace")
        except _CONNECTION_ERRORS as exc:
            raise self._lost(exc) from None

        async def lines() -> AsyncIterator[str]:
            try:
                async for line in process.stdout:
                    yield line
            except _CONNECTION_ERRORS as exc:
                raise self._lost(exc) from None

        try:
            yield lines()
        finally:
            process.close()

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
                    prefix = f"{_SOCKET_DIR_PREFIX}{os.getpid()}-"
                    self._tmpdir = await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix)
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

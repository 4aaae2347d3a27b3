"""The connection seam's exceptions: library errors are translated into these at the boundary.

Exception tree (``transient`` on each says whether retrying later can help; the phase runner reads only that)::

    HostUnreachable            could not reach or keep a session with the host (transient: retry)
     +-- HostKeyRejected       host key did not verify against known_hosts (terminal)
     +-- AuthenticationRejected our key was refused or unreadable (terminal)
    CommandError               the command ran and failed (non-zero exit; terminal)
     +-- CommandTimeout        it did not finish within its timeout
     +-- RemoteFileError       an SFTP operation failed (missing file, permission, ...)
"""

from __future__ import annotations

import asyncio
import socket

import asyncssh

_STDERR_TAIL = 400  # characters of stderr kept in a CommandError message



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

    transient = False

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

"""The SSH connection seam: one asyncssh connection per host, kept and reused across reconciles.

Why one connection: the seed deployer opened a new SSH session per phase and accepted any host key;
here every command, SFTP transfer and tunnel (Docker socket, health-check port) shares one verified
connection per host, and the pool counts round trips so a benchmark can hold us to that. Nothing outside
this package holds an SFTP client.

- ``errors``: the exception tree; asyncssh and OS errors are translated there, each with ``transient``;
- ``session``: one host's ``Connection`` (commands, tunnels) and its counters (``HostStats``); ``sftp``: its file calls;
- ``pool``: ``ConnectionPool``, one live connection per host;
- ``names``: temp names of atomic writes on hosts, and the local forwarded-socket dirs.

Commands are argv lists joined with :func:`shlex.join`; never interpolated shell strings. Secrets go
through ``input`` (stdin) or SFTP, never the command line. Nothing here logs argv beyond ``argv[0]``.
"""

from deployerd.connection.errors import (
    AuthenticationRejected,
    CommandError,
    CommandTimeout,
    HostKeyRejected,
    HostUnreachable,
    RemoteFileError,
)
from deployerd.connection.names import sweep_socket_dirs, temp_name_pattern
from deployerd.connection.pool import ConnectionPool
from deployerd.connection.session import REMOTE_DOCKER_SOCKET, Completed, Connection, HostAddress, HostStats

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
    "REMOTE_DOCKER_SOCKET",
    "RemoteFileError",
    "sweep_socket_dirs",
    "temp_name_pattern",
]

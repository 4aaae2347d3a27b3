"""One host's files over the connection's SFTP client: atomic writes, reads, folders, links, renames.

A mixin of ``session.Connection`` (which owns the SFTP client and translates its errors): every public call
here is one counted round trip (``HostStats.sftp_ops``), and no SFTP client is used outside this package.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import asyncssh

from deployerd.connection.errors import _CONNECTION_ERRORS
from deployerd.connection.names import _temp_name

if TYPE_CHECKING:
    from deployerd.connection.session import HostStats

_CHUNK = 1024 * 1024  # local read size of put_file and replace_file_from (read off the event loop)


async def _copy(src: BinaryIO, f: Any) -> int:
    """Copy ``src`` into the remote file ``f`` chunk by chunk; the bytes copied."""
    n = 0
    while chunk := await asyncio.to_thread(src.read, _CHUNK):
        await f.write(chunk)
        n += len(chunk)
    return n


class RemoteFiles:
    """The SFTP calls of a connection (``sftp`` and ``_sftp_error`` come from ``Connection``)."""

    stats: HostStats

    async def sftp(self) -> asyncssh.SFTPClient:
        raise NotImplementedError

    def _sftp_error(self, op: str, path: str, exc: BaseException) -> Exception:
        raise NotImplementedError

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
        try:
            await self._put_atomic(remote, mode, lambda f: _copy(src, f))
        finally:
            await asyncio.to_thread(src.close)

    async def read_bytes(self, path: str) -> bytes:
        """Read a whole remote file; RemoteFileError(.not_found) if it is absent."""
        self.stats.sftp_ops += 1
        sftp = await self.sftp()
        try:
            async with sftp.open(path, "rb", encoding=None) as f:
                data: bytes | str = await f.read()  # bytes: no encoding (the stubs say str)
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

    async def replace_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``path`` in place, first removing what is there (never editing a file another path may share
        as a hard link). Not atomic: for files inside a folder that is renamed into place as a whole."""
        async def write(sftp: asyncssh.SFTPClient) -> None:
            if await sftp.lexists(path):
                await sftp.remove(path)
            async with sftp.open(path, "wb", encoding=None) as f:
                await f.write(data)
            await sftp.chmod(path, mode)

        await self._sftp_call("write", path, write)

    async def replace_file_from(self, path: str, src: BinaryIO, mode: int = 0o644) -> int:
        """``replace_file`` with the content read from ``src`` in chunks (off the event loop), so a large file is
        never held whole in memory; returns the bytes written."""
        written = 0

        async def write(sftp: asyncssh.SFTPClient) -> None:
            nonlocal written
            if await sftp.lexists(path):
                await sftp.remove(path)
            async with sftp.open(path, "wb", encoding=None) as f:
                written = await _copy(src, f)
            await sftp.chmod(path, mode)

        await self._sftp_call("write", path, write)
        return written

    async def replace_symlink(self, target: str, path: str) -> None:
        """Make ``path`` a symlink to ``target``, first removing what is there."""
        async def link(sftp: asyncssh.SFTPClient) -> None:
            if await sftp.lexists(path):
                await sftp.remove(path)
            await sftp.symlink(target, path)

        await self._sftp_call("symlink", path, link)

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

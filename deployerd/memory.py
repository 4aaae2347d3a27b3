"""Keep a long-running daemon's resident memory to what it uses (glibc only; a no-op elsewhere).

glibc's malloc gives each thread that allocates its own arena, and keeps freed memory in every arena for
reuse instead of handing it back to the kernel. A daemon that runs git, SFTP and the store in worker
threads for weeks then holds the high-water mark of every burst in several arenas: resident memory creeps
up though the Python objects alive stay flat. Two standard remedies (the ones ``MALLOC_ARENA_MAX`` and
``malloc_trim(3)`` give): cap the arenas at start, and hand free pages back after each reconcile.
"""

from __future__ import annotations

import ctypes

_M_ARENA_MAX = -8  # mallopt parameter numbers, from glibc's malloc.h


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only: musl and others lack it)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_libc = _glibc()


def limit_arenas(count: int = 2) -> bool:
    """Cap malloc's arenas at ``count``; call before threads start. True when glibc took it."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(_M_ARENA_MAX, count))


def trim() -> bool:
    """Give free heap pages back to the kernel (every arena, not only the top). Takes a few ms."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))

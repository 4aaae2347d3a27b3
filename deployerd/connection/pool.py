"""The pool: one live Connection per host name, reconnected when it was lost or the address changed."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from deployerd.connection.session import Connection, HostAddress, HostStats


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

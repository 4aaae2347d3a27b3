"""SQLite persistence of droplet records and the id counter.

The original Registry kept everything in memory, so a restart lost every registration; here each write is
one transaction. One connection guarded by one lock serialises all access (SQLite allows one writer
anyway); the async methods run the blocking work in a thread so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import builtins  # the class's own list() method shadows the name in its annotations
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from deployerd.udc import iso_now

DropletStatus = Literal["active", "inactive", "error"]
PATCHABLE = frozenset({"status", "endpoint", "metadata", "proof", "cost_usd", "yield_usd"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS droplets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    steward TEXT,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    proof TEXT,
    cost_usd REAL NOT NULL DEFAULT 0,
    yield_usd REAL NOT NULL DEFAULT 0,
    metadata TEXT,
    registered_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    next_id INTEGER NOT NULL
);
INSERT OR IGNORE INTO counter (only_row, next_id) VALUES (1, 1);
"""
_COLUMNS = "id, name, steward, status, endpoint, proof, cost_usd, yield_usd, metadata, registered_at, updated_at"


class Droplet(BaseModel):
    """A droplet record exactly as the contract defines it."""

    id: int
    name: str
    steward: str | None = None
    status: DropletStatus
    endpoint: str
    proof: str | None = None
    cost_usd: float = 0
    yield_usd: float = 0
    metadata: dict[str, Any] | None = None
    registered_at: str
    updated_at: str


class Conflict(Exception):
    """The name (or the explicit id) is already taken."""


def _row(row: tuple[Any, ...]) -> Droplet:
    values = dict(zip(_COLUMNS.split(", "), row, strict=True))
    values["metadata"] = json.loads(values["metadata"]) if values["metadata"] is not None else None
    return Droplet.model_validate(values)


class DropletStore:
    """Droplets in one SQLite file; every method is safe to await from the event loop."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a process crash, no fsync per write
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def create(
        self, name: str, endpoint: str, *, droplet_id: int | None = None, steward: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Droplet:
        """Insert with status "active". No id (or 0) takes the counter; an explicit id raises it past that id."""
        return await asyncio.to_thread(self._create, name, endpoint, droplet_id or None, steward, metadata)

    async def list(self) -> list[Droplet]:
        return await asyncio.to_thread(self._query, f"SELECT {_COLUMNS} FROM droplets ORDER BY id", ())

    async def get(self, droplet_id: int) -> Droplet | None:
        rows = await asyncio.to_thread(self._query, f"SELECT {_COLUMNS} FROM droplets WHERE id = ?", (droplet_id,))
        return rows[0] if rows else None

    async def get_by_name(self, name: str) -> Droplet | None:
        rows = await asyncio.to_thread(self._query, f"SELECT {_COLUMNS} FROM droplets WHERE name = ?", (name,))
        return rows[0] if rows else None

    async def update(self, droplet_id: int, changes: dict[str, Any]) -> Droplet | None:
        """Set the given fields (metadata replaced whole, never merged); None if the id is unknown."""
        unknown = set(changes) - PATCHABLE
        if unknown:
            raise ValueError(f"not patchable: {sorted(unknown)}")
        return await asyncio.to_thread(self._update, droplet_id, changes)

    async def delete(self, droplet_id: int) -> bool:
        return await asyncio.to_thread(self._delete, droplet_id)

    async def ping(self) -> bool:
        """True when the database answers a query (the Registry's own health)."""
        try:
            await asyncio.to_thread(self._query_raw, "SELECT 1", ())
        except sqlite3.Error:
            return False
        return True

    # -- blocking parts, run in a worker thread under the lock --

    def _query_raw(self, sql: str, params: tuple[Any, ...]) -> builtins.list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _query(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Droplet]:
        return [_row(r) for r in self._query_raw(sql, params)]

    def _create(
        self, name: str, endpoint: str, droplet_id: int | None, steward: str | None, metadata: dict[str, Any] | None,
    ) -> Droplet:
        now = iso_now()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM droplets WHERE name = ?", (name,)).fetchone():
                    raise Conflict(f"droplet named {name!r} already exists")
                (next_id,) = db.execute("SELECT next_id FROM counter").fetchone()
                if droplet_id is None:
                    droplet_id = next_id
                elif db.execute("SELECT 1 FROM droplets WHERE id = ?", (droplet_id,)).fetchone():
                    raise Conflict(f"droplet id {droplet_id} already exists")
                db.execute("UPDATE counter SET next_id = ?", (max(next_id, droplet_id + 1),))
                db.execute(
                    f"INSERT INTO droplets ({_COLUMNS}) VALUES (?, ?, ?, 'active', ?, NULL, 0, 0, ?, ?, ?)",
                    (droplet_id, name, steward, endpoint, _dump(metadata), now, now),
                )
                row = db.execute(f"SELECT {_COLUMNS} FROM droplets WHERE id = ?", (droplet_id,)).fetchone()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return _row(row)

    def _update(self, droplet_id: int, changes: dict[str, Any]) -> Droplet | None:
        values = {k: _dump(v) if k == "metadata" else v for k, v in changes.items()}
        values["updated_at"] = iso_now()
        assignments = ", ".join(f"{k} = ?" for k in values)  # keys checked against PATCHABLE above
        with self._lock:
            cur = self._db.execute(f"UPDATE droplets SET {assignments} WHERE id = ?", (*values.values(), droplet_id))
            if cur.rowcount == 0:
                return None
            row = self._db.execute(f"SELECT {_COLUMNS} FROM droplets WHERE id = ?", (droplet_id,)).fetchone()
        return _row(row)

    def _delete(self, droplet_id: int) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM droplets WHERE id = ?", (droplet_id,)).rowcount > 0


def _dump(metadata: dict[str, Any] | None) -> str | None:
    return json.dumps(metadata) if metadata is not None else None

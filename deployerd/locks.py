"""Host locks: one lock file per service on its host, so daemons sharing servers never interleave deploys.

Where: ``<base_dir>/.locks/<qualified name>.lock`` (service names are DNS labels, so no service dir can be
``.locks``). What: a JSON record (holder = the daemon's id, hostname, pid, instance, service, job, a token
per acquisition, acquired_at, expires_at).

The protocol, every step an atomic SFTP operation on the host (no read-then-write race decides ownership):

- acquire: write the record to a unique temp file, then hard-link it to the lock path. The link fails if the
  lock exists, so exactly one contender wins and the lock appears with its whole content at once.
- take over a lock that expired, or one of this daemon's own id that no job of this process holds (left by an
  earlier life of the daemon, e.g. SIGKILL: taken over at once, never waited for): rename it aside to a unique
  name (only one taker can move it), delete it if what moved is byte for byte the record judged stale,
  otherwise put it back (it was renewed, or is a new lock), then acquire as above.
- renew: every ttl/3 while the job runs, rewrite the record (temp + rename) if it is still ours and not
  about to expire; a renewal changes the bytes, so a taker that judged the older record stale puts it back.
- release: rename aside, delete if ours, otherwise put back. Errors never fail the job: the lock expires.

Expiry is judged by each daemon's own clock (UTC): daemons sharing hosts need clocks in sync (NTP); a skew
larger than a third of the ttl could let a live lock be taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import posixpath
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from deployerd.connection import Connection, HostUnreachable, RemoteFileError

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCK_DIR = ".locks"
ID_FILE = "daemon-id"
_MAX_SPINS = 10  # per acquire: failed links that found a stale lock or none (a race, or a real error)


class LockRecord(BaseModel):
    """What a lock file holds."""

    holder: str  # the daemon id (stable across restarts of one daemon)
    hostname: str = ""
    pid: int = 0
    instance: str = ""
    service: str = ""
    job: str = ""
    token: str  # unique per acquisition: "still ours" compares tokens, not holders
    acquired_at: datetime
    expires_at: datetime

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def describe(self) -> str:
        return (f"{self.holder} (instance {self.instance}, {self.hostname} pid {self.pid}, job {self.job}) "
                f"until {self.expires_at.isoformat(timespec='seconds')}")

    def encode(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


class Verdict(enum.Enum):
    WAIT = "wait"  # a live holder: another daemon, or a job of this very process
    OWN_STALE = "own_stale"  # our daemon id but no job of ours holds it: left by an earlier life
    EXPIRED = "expired"
    UNREADABLE = "unreadable"  # not a lock record at all (hand-made, truncated by a full disk)


class LockBusy(Exception):
    """Another live holder kept the lock past our wait: transient, the engine retries with backoff."""

    transient = True

    def __init__(self, host: str, service: str, path: str, holder: LockRecord, waited_s: float) -> None:
        self.host, self.service, self.path, self.holder = host, service, path, holder
        super().__init__(f"host {host}: service {service} is locked by {holder.describe()} "
                         f"({path}); waited {waited_s:.1f}s")


def utcnow() -> datetime:
    return datetime.now(UTC)


def lock_path(base_dir: str, name: str) -> str:
    return posixpath.join(base_dir, LOCK_DIR, f"{name}.lock")


def parse(data: bytes) -> LockRecord | None:
    try:
        return LockRecord.model_validate_json(data)
    except ValidationError:
        return None


def judge(rec: LockRecord | None, me: str, held: set[str], now: datetime) -> Verdict:
    """What to do about a lock someone else's link found in place (pure: unit-tested)."""
    if rec is None:
        return Verdict.UNREADABLE
    if rec.holder == me and rec.token not in held:
        return Verdict.OWN_STALE
    if rec.expired(now):
        return Verdict.EXPIRED
    return Verdict.WAIT


def load_daemon_id(state_dir: Path) -> str:
    """This daemon's id, made once (random, 0600) and kept in its state dir so it survives restarts.
    Made like a lock (temp file, then link), so a crash never leaves an empty id. Blocking: call it in a thread."""
    path = state_dir / ID_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = state_dir / f".{ID_FILE}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"d{secrets.token_hex(8)}\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
    text = path.read_text().strip()
    if not text or len(text) > 64 or not text.isalnum():
        raise ValueError(f"{path}: not a daemon id (remove it to make a new one)")
    return text


class HostLocks:
    """One daemon's side of host locks: its id, the settings, and the tokens its running jobs hold."""

    def __init__(
        self,
        state_dir: Path | None,
        *,
        ttl_s: float = 60.0,
        wait_s: float = 120.0,
        instance: str = "default",
        poll_s: float = 1.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.instance = instance
        self.poll_s = poll_s
        self.on_event = on_event or (lambda event: None)
        self.held: set[str] = set()  # tokens of the locks this process holds right now
        self._id: str | None = None
        self._id_lock = asyncio.Lock()

    async def daemon_id(self) -> str:
        async with self._id_lock:
            return await self._load_id()

    async def _load_id(self) -> str:
        if self._id is None:
            if self.state_dir is None:
                self._id = f"d{secrets.token_hex(8)}"  # no state dir: an id for this process only
            else:
                self._id = await asyncio.to_thread(load_daemon_id, self.state_dir)
        return self._id

    def lock(self, conn: Connection, base_dir: str, name: str, job: str) -> HostLock:
        return HostLock(self, conn, base_dir, name, job)


class HostLock:
    """The lock of one service on one host for one job: ``acquire`` once, ``release`` always (never raises)."""

    def __init__(self, owner: HostLocks, conn: Connection, base_dir: str, name: str, job: str) -> None:
        self.owner = owner
        self.conn = conn
        self.name = name
        self.job = job
        self.path = lock_path(base_dir, name)
        self.record: LockRecord | None = None
        self.lost = False
        self.round_trips = 0  # this lock's own SFTP calls (the connection's counters are shared by jobs)
        self._renewer: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        return self.conn.host.name

    def _new_record(self, me: str) -> LockRecord:
        now = utcnow()
        return LockRecord(
            holder=me, hostname=socket.gethostname(), pid=os.getpid(), instance=self.owner.instance,
            service=self.name, job=self.job, token=secrets.token_hex(8), acquired_at=now,
            expires_at=now + timedelta(seconds=self.owner.ttl_s),
        )

    async def acquire(self) -> dict[str, Any]:
        """Take the lock, waiting up to ``wait_s`` for a live holder; raise LockBusy past that.
        Returns what the job records: holder, expiry, whom it waited for, what it took over."""
        me = await self.owner.daemon_id()
        t0, rt0 = time.monotonic(), self.round_trips
        deadline = t0 + self.owner.wait_s
        waited_for: LockRecord | None = None
        took_over: list[str] = []
        spins = 0  # failed links that found no live lock to wait for: bounded, whatever the host does
        while True:
            mine = self._new_record(me)
            self.owner.held.add(mine.token)  # before the link: a job of ours must never judge it stale
            try:
                link_error = await self._create(mine)
            except BaseException:
                self.owner.held.discard(mine.token)
                raise
            if link_error is None:
                break
            self.owner.held.discard(mine.token)
            data, verdict = await self._look(me)
            if verdict is not Verdict.WAIT:  # the link failed, yet no live lock is there
                spins += 1
                if spins > _MAX_SPINS:
                    raise link_error
            while verdict is Verdict.WAIT:  # a live holder: watch it, one read a poll, until it goes
                assert data is not None
                rec = parse(data)
                assert rec is not None
                if waited_for is None:
                    self.owner.on_event("waited")
                    log.info("host %s: job %s waits for the lock of %s held by %s", self.host, self.job,
                             self.name, rec.describe())
                waited_for = rec
                left = deadline - time.monotonic()
                if left <= 0:
                    self.owner.on_event("busy")
                    raise LockBusy(self.host, self.name, self.path, rec, time.monotonic() - t0)
                await asyncio.sleep(min(self.owner.poll_s, left))
                data, verdict = await self._look(me)
            if verdict is None:
                continue  # released: link again at once
            if data is not None and await self._remove_if(data.__eq__):
                rec = parse(data)
                took_over.append(f"{verdict.value}: {rec.describe() if rec else repr(data[:100])}")
                self.owner.on_event("taken_over")
                log.warning("host %s: took over the lock of %s (%s)", self.host, self.name, took_over[-1])
        self.record = mine
        self.owner.on_event("acquired")
        self._renewer = asyncio.create_task(self._renew(), name=f"renew lock {self.host}:{self.name}")
        return {
            "path": self.path,
            "holder": me,
            "expires_at": mine.expires_at.isoformat(timespec="seconds"),
            "waited_s": round(time.monotonic() - t0, 3),
            "waited_for": waited_for.describe() if waited_for else None,
            "took_over": took_over,
            "round_trips": self.round_trips - rt0,
        }

    async def release(self) -> None:
        """Remove the lock if it is still ours. Never raises: a lock left behind expires by itself."""
        record, self.record = self.record, None
        if record is None:
            return
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        self.owner.held.discard(record.token)
        try:
            if not await self._remove_if(lambda b: _token(b) == record.token):
                self._lose("it was no longer ours at release")
        except (HostUnreachable, RemoteFileError) as e:
            log.warning("host %s: could not release the lock of %s (%s); it expires at %s", self.host, self.name,
                        e, record.expires_at.isoformat(timespec="seconds"))

    # -- steps, each one or a few SFTP round trips

    async def _create(self, record: LockRecord) -> RemoteFileError | None:
        """Exclusive create with full content: temp file, then hard link (fails if the lock exists).
        Returns None on success, else the link's error."""
        tmp = f"{self.path}.new-{record.token}"
        try:
            await self._op(self.conn.put_bytes(tmp, record.encode(), mode=0o644))
        except RemoteFileError as e:
            if not e.not_found:
                raise
            await self._op(self.conn.makedirs(posixpath.dirname(self.path)))  # first lock on this host
            await self._op(self.conn.put_bytes(tmp, record.encode(), mode=0o644))
        try:
            await self._op(self.conn.link(tmp, self.path))
            return None
        except RemoteFileError as e:
            return e
        finally:
            with contextlib.suppress(RemoteFileError, HostUnreachable):
                await self._op(self.conn.remove(tmp))

    async def _op(self, call: Awaitable[T]) -> T:
        self.round_trips += 1
        return await call

    async def _look(self, me: str) -> tuple[bytes | None, Verdict | None]:
        """The lock in place (None: there is none) and what to do about it."""
        data = await self._read(self.path)
        if data is None:
            return None, None
        return data, judge(parse(data), me, self.owner.held, utcnow())

    async def _read(self, path: str) -> bytes | None:
        try:
            return await self._op(self.conn.read_bytes(path))
        except RemoteFileError as e:
            if e.not_found:
                return None
            raise

    async def _remove_if(self, check: Callable[[bytes], bool]) -> bool:
        """Move the lock aside (atomic: one mover wins), delete it if ``check`` passes, else put it back."""
        aside = f"{self.path}.gone-{secrets.token_hex(6)}"
        try:
            await self._op(self.conn.rename(self.path, aside))
        except RemoteFileError as e:
            if e.not_found:
                return False
            raise
        try:
            data = await self._read(aside)
            if data is not None and check(data):
                return True
            try:  # put it back; this fails only if a newer lock is already in place
                await self._op(self.conn.link(aside, self.path))
            except RemoteFileError:
                log.warning("host %s: a lock of %s moved aside could not be put back", self.host, self.name)
            return False
        finally:
            with contextlib.suppress(RemoteFileError, HostUnreachable):
                await self._op(self.conn.remove(aside))

    async def _renew(self) -> None:
        """Push the expiry forward every ttl/3 while ours; give up (and say so) once it is not."""
        period = self.owner.ttl_s / 3
        while self._holding():
            await asyncio.sleep(period)
            record = self.record
            if record is None:
                return
            try:
                data = await self._read(self.path)
                now = utcnow()
                if data is None or _token(data) != record.token:
                    return self._lose("it was removed or taken over")
                if now >= record.expires_at - timedelta(seconds=period / 2):
                    return self._lose("it could not be renewed before its expiry")
                renewed = record.model_copy(update={"expires_at": now + timedelta(seconds=self.owner.ttl_s)})
                await self._op(self.conn.put_bytes(self.path, renewed.encode(), mode=0o644))
                self.record = renewed
            except (HostUnreachable, RemoteFileError) as e:  # try again next period, while time is left
                log.warning("host %s: renewing the lock of %s failed: %s", self.host, self.name, e)

    def _holding(self) -> bool:
        return self.record is not None

    def _lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        self.owner.on_event("lost")
        log.warning("host %s: job %s lost the lock of %s: %s", self.host, self.job, self.name, why)


def _token(data: bytes) -> str | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value.get("token") if isinstance(value, dict) else None

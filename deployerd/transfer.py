"""Transfer phase: the service's source at the pinned commit into a release directory, over SSH.

Only what changed since the previous release crosses the network: the previous release directory is copied
on the host (a local copy, no network; one remote step also removes the files that disappeared and makes the
new folders), then the files whose blob hash differs are sent. A changed file of at least ``DELTA_MIN_SIZE``
whose path was a file in the previous release is sent as a block delta against the host's copy (deployerd.delta:
two remote steps for all such files together, one for block hashes, one to rebuild and verify); the rest, and
any delta the host could not verify, are written whole over SFTP (one write is cheaper than a hash round trip for
a small file).
Everything lands in ``<release>.partial`` and is renamed into place at the end, so a crash mid-transfer never
leaves a half-written release that looks complete (one step moves it); the manifest, written last, is sent as a
patch of the previous one when that patch and its script are smaller than the manifest.

``bytes_sent`` counts what this phase writes to the host: file data, delta frames, the command lines of its
remote steps (remote scripts included, every time) and manifest bytes; not SSH/SFTP framing nor the paths in
SFTP requests (a few hundred bytes). ``bytes_sent_detail`` splits it; ``bytes_received_hashes`` is what the
block hashes cost the other way.

Limits: a delta matches blocks at fixed offsets (in-place edits, appends, truncations, block-aligned moves);
an insertion that shifts the rest of a file by a non-multiple of the block size sends the rest whole (rsync's
rolling checksum does better there).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import posixpath
import shlex
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from deployerd import delta
from deployerd.connection import CommandTimeout, Completed, Connection
from deployerd.runtimes.base import ReleaseContext
from deployerd.tree import Entry, Tree, TreeError

log = logging.getLogger(__name__)

_PARALLEL_WRITES = 16
DELTA_MIN_SIZE = 8 * 1024  # below this a whole write costs less than the hash round trip and the scripts
_ARGV_BUDGET = 64 * 1024  # characters of paths per remote delta step (Linux caps one argument at 128 KiB)
_BATCH_BYTES = 64 * 1024 * 1024  # file bytes per delta batch (hashed by the host in one step; streamed here)
_STREAM_MIN = 1024 * 1024  # a file this large is streamed from git to the host, never held whole in memory


# One remote step instead of four or more (rm, mkdir, cp, rm of the files that went, then one SFTP mkdir per
# folder). argv: PARTIAL PREVIOUS GONE DIR...; stdin: the paths to remove, NUL-separated, when GONE is 1. Prints
# "copied" when PARTIAL starts as a copy of PREVIOUS, else it is an empty folder. Paths are arguments or input,
# never part of the script.
_PREPARE = ('p=$1 prev=$2 gone=$3; shift 3; rm -rf -- "$p" && mkdir -p -- "${p%/*}" || exit 1; '
            'if [ -n "$prev" ] && cp -a -- "$prev" "$p" 2>/dev/null; then echo copied; '
            '[ "$gone" = 0 ] || xargs -0r rm -rf -- || exit 1; '
            'else rm -rf -- "$p"; mkdir -p -- "$p" || exit 1; fi; [ $# -eq 0 ] || mkdir -p -- "$@"')
# argv: PARTIAL RELEASE: the finished release moved into place (one step, was two).
_INSTALL = 'rm -rf -- "$2" && mv -T -- "$1" "$2"'


def manifest_path(ctx: ReleaseContext, release: str | None = None) -> str:
    return ctx.layout.manifest(release or ctx.release.id)


def _rel(e: Entry, prefix: str) -> str:
    return posixpath.relpath(e.path, prefix)


def _manifest(entries: list[Entry], prefix: str) -> dict[str, list[Any]]:
    return {_rel(e, prefix): [e.kind, e.mode, e.sha] for e in entries}


def _file_mode(e: Entry) -> int:
    return 0o755 if e.mode & 0o111 else 0o644


async def _read_manifest(conn: Connection, path: str) -> dict[str, list[Any]] | None:
    try:
        manifest: dict[str, list[Any]] = json.loads(await conn.read_bytes(path))
        return manifest
    except Exception:  # absent or unreadable: treat as no previous release
        return None


async def _none() -> None:
    return None


class _Wire:
    """The phase's connection, counting the bytes it writes by kind (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sent: Counter[str] = Counter()
        self.received_hashes = 0

    async def run(self, argv: Sequence[str], *, input: bytes | None = None, kind: str = "commands",
                  check: bool = True, timeout: float | None = 60) -> Completed:
        self.sent["commands"] += len(shlex.join(argv).encode())
        if input:
            self.sent[kind] += len(input)
        return await self.conn.run(argv, input=input, check=check, timeout=timeout)


def _batches(entries: list[Entry], source: str) -> Iterator[list[Entry]]:
    """Groups of files small enough for one command line and for memory."""
    batch: list[Entry] = []
    chars = size = 0
    for e in entries:
        n = len(shlex.quote(_rel(e, source))) + 8
        if batch and (chars + n > _ARGV_BUDGET or size + e.size > _BATCH_BYTES):
            yield batch
            batch, chars, size = [], 0, 0
        batch.append(e)
        chars += n
        size += e.size
    if batch:
        yield batch


def _old_hashes(line: str) -> list[bytes] | None:
    """The host's block hashes of its copy of one file (its line of the hash step), or None."""
    if not line.startswith("+"):
        return None  # the host could not read its copy
    try:
        raw = base64.b64decode(line[1:], validate=True)
    except binascii.Error:
        return None
    if len(raw) % delta.DIGEST_SIZE:
        return None
    return [raw[i:i + delta.DIGEST_SIZE] for i in range(0, len(raw), delta.DIGEST_SIZE)]


def _frame(tree: Tree, e: Entry, line: str) -> bytes | None:
    """The delta frame for one file from the host's hash line, or None when a whole write is as good. The file
    is streamed from the tree block by block (blocking: run it in a thread), never held whole."""
    old = _old_hashes(line)
    if old is None:
        return None
    bs, sha, size = delta.block_size(e.size), hashlib.sha256(), 0
    with tree.open(e.path) as fh:
        def blocks() -> Iterator[bytes]:
            nonlocal size
            while block := fh.read(bs):
                sha.update(block)
                size += len(block)
                yield block

        ops = delta.plan_blocks(blocks(), old, literal_max=e.size)
    if ops is None:
        return None
    frame = delta.encode_ops(sha.digest(), size, bs, _file_mode(e), ops)
    return frame if len(frame) < size else None


async def _hashes(wire: _Wire, prev_dir: str, batch: list[Entry], source: str) -> list[str] | None:
    """The host's block hashes of the previous release's copies of ``batch`` (one line per file), or None."""
    argv = ["python3", "-c", delta.SIGNATURE_SCRIPT, prev_dir,
            *(x for e in batch for x in (_rel(e, source), str(delta.block_size(e.size))))]
    try:
        sig = await wire.run(argv, check=False, timeout=_timeout(batch))
    except CommandTimeout as e:
        log.warning("%s; sending %d file(s) whole", e, len(batch))
        return None
    lines = sig.stdout.splitlines()
    if not sig.ok or len(lines) != len(batch):
        log.warning("%s: block hashes of %d file(s) failed (exit %d: %s); sending them whole",
                    wire.conn.host.name, len(batch), sig.exit_status, sig.stderr.strip()[-200:])
        return None
    wire.received_hashes += len(sig.stdout)
    return lines


def _timeout(batch: list[Entry]) -> float:
    return 60 + sum(e.size for e in batch) / 10e6  # hashing or rebuilding at 10 MB/s at worst


async def _send_deltas(wire: _Wire, tree: Tree, partial: str, source: str, batches: list[list[Entry]],
                       hashing: list[asyncio.Task[list[str] | None]]) -> tuple[list[Entry], list[Entry], list[str]]:
    """Rebuild each batch's files in ``partial`` (a copy of the previous release) from the host's hashes.

    Returns (rebuilt, to send whole, failures): a file goes whole when no delta saves bytes or the host
    could not hash, rebuild or verify it (a failure, logged)."""
    done: list[Entry] = []
    whole: list[Entry] = []
    failed: list[str] = []
    for batch, hashes in zip(batches, hashing, strict=True):
        rels = [_rel(e, source) for e in batch]
        lines = await hashes
        if lines is None:
            whole += batch
            failed += rels
            continue
        frames = await asyncio.gather(*(asyncio.to_thread(_frame, tree, e, ln)
                                        for e, ln in zip(batch, lines, strict=True)))
        todo = [(e, rel, f) for e, rel, f in zip(batch, rels, frames, strict=True) if f is not None]
        whole += [e for e, f in zip(batch, frames, strict=True) if f is None]
        if not todo:
            continue
        res = await wire.run(["python3", "-c", delta.APPLY_SCRIPT, partial, *(rel for _, rel, _ in todo)],
                             input=b"".join(f for _, _, f in todo), kind="delta", check=False,
                             timeout=_timeout(batch))
        outcome = res.stdout.splitlines()
        for k, (e, rel, _) in enumerate(todo):
            if res.ok and k < len(outcome) and outcome[k] == "ok":
                done.append(e)
            else:
                whole.append(e)
                failed.append(rel)
                log.warning("%s: delta of %s not applied (%s); sending it whole", wire.conn.host.name, rel,
                            outcome[k] if k < len(outcome) else f"exit {res.exit_status}: {res.stderr.strip()[-200:]}")
    return done, whole, failed


async def _write_manifest(wire: _Wire, path: str, wanted: dict[str, list[Any]],
                          prev_path: str | None, prev: dict[str, list[Any]] | None) -> None:
    """Write the manifest atomically: as a patch of the previous one on the host when there is one and the patch
    with its script is smaller than the manifest (else one SFTP write: also faster than starting ``python3``)."""
    text = json.dumps(wanted, sort_keys=True).encode()
    if prev_path is not None and prev is not None:
        patch = json.dumps({"set": {k: v for k, v in wanted.items() if prev.get(k) != v},
                            "del": [k for k in prev if k not in wanted],
                            "sha256": hashlib.sha256(text).hexdigest()}).encode()
        argv = ["python3", "-c", delta.MANIFEST_SCRIPT, prev_path, path]
        if len(patch) + len(shlex.join(argv)) < len(text):
            done = await wire.run(argv, input=patch, kind="manifest", check=False)
            if done.ok:
                return
            log.warning("%s: manifest patch failed (exit %d); writing it whole", wire.conn.host.name,
                        done.exit_status)
    await wire.conn.put_bytes(path, text, mode=0o644)
    wire.sent["manifest"] += len(text)


async def _stream(conn: Connection, tree: Tree, e: Entry, dest: str) -> int:
    """Write one large file from the tree's stream (git's own ``cat-file``), chunk by chunk; the bytes sent."""
    opened = tree.open(e.path)
    src = await asyncio.to_thread(opened.__enter__)
    try:
        sent = await conn.replace_file_from(dest, src, _file_mode(e))
    finally:
        await asyncio.to_thread(opened.__exit__, None, None, None)
    if sent != e.size:
        raise TreeError(f"{e.path}: read {sent} bytes of {e.size} from the tree")
    return sent


def _diff(entries: list[Entry], wanted: dict[str, list[Any]], base: dict[str, list[Any]],
          batches: list[list[Entry]], source: str) -> tuple[list[str], list[Entry]]:
    """What a release built on ``base`` lacks: the paths to remove, and the files to write whole (changed ones
    not sent as deltas)."""
    chosen = {e for b in batches for e in b}
    gone = [p for p in base if p not in wanted]
    whole = [e for e in entries if base.get(_rel(e, source)) != wanted[_rel(e, source)] and e not in chosen]
    return gone, whole


def _dirs(partial: str, files: list[Entry], source: str) -> list[str]:
    """The folders the files written whole land in (``partial`` itself is made by the prepare step)."""
    dirs = {posixpath.dirname(posixpath.join(partial, _rel(e, source))) for e in files}
    return sorted(dirs - {partial})


async def transfer(conn: Connection, tree: Tree, ctx: ReleaseContext, previous: str | None) -> dict[str, Any]:
    """Make ``ctx.release_dir`` hold exactly the source folder at the commit; returns what was sent."""
    source = ctx.spec.source.rstrip("/")
    entries = [e for e in await asyncio.to_thread(tree.entries, source) if e.kind != "other"]
    wanted = _manifest(entries, source)
    have, prev_manifest = await asyncio.gather(
        _read_manifest(conn, manifest_path(ctx)),
        _read_manifest(conn, manifest_path(ctx, previous)) if previous else _none())
    if have == wanted and (await conn.run(["test", "-d", ctx.release_dir], check=False)).exit_status == 0:
        return {"files_total": len(wanted), "files_sent": 0, "bytes_sent": 0, "reused": "release already on host"}

    wire = _Wire(conn)
    prev_dir = ctx.layout.release_dir(previous or "")
    old = prev_manifest or {}
    by_delta = [e for e in entries if e.kind == "file" and e.size >= DELTA_MIN_SIZE
                and (was := old.get(rel := _rel(e, source))) is not None and was[0] == "file" and was != wanted[rel]]
    batches = list(_batches(by_delta, source))
    # the host hashes the previous release's blocks while it copies that release: both only read it
    hashing = [asyncio.create_task(_hashes(wire, prev_dir, b, source)) for b in batches]
    try:
        return await _fill(wire, tree, ctx, source, entries, wanted, previous, prev_manifest, batches, hashing)
    finally:
        for task in hashing:  # unused when the copy failed, or the phase failed first
            task.cancel()
        await asyncio.gather(*hashing, return_exceptions=True)


async def _fill(wire: _Wire, tree: Tree, ctx: ReleaseContext, source: str, entries: list[Entry],
                wanted: dict[str, list[Any]], previous: str | None, prev_manifest: dict[str, list[Any]] | None,
                batches: list[list[Entry]], hashing: list[asyncio.Task[list[str] | None]]) -> dict[str, Any]:
    """Copy the previous release, send what changed (deltas and whole files), move the release into place."""
    conn = wire.conn
    partial = ctx.layout.partial_dir(ctx.release.id)
    base: dict[str, list[Any]] = prev_manifest if previous and prev_manifest is not None else {}
    prev_dir = ctx.layout.release_dir(previous) if previous and base else ""
    gone, whole = _diff(entries, wanted, base, batches, source)
    removed = b"".join(posixpath.join(partial, p).encode() + b"\0" for p in gone)
    prepared = await wire.run(["sh", "-c", _PREPARE, "sh", partial, prev_dir, "1" if gone else "0",
                               *_dirs(partial, whole, source)], input=removed or None)
    if base and prepared.stdout.strip() != "copied":  # the previous release could not be copied: all whole
        base, batches, hashing = {}, [], []
        gone, whole = _diff(entries, wanted, base, batches, source)
        for d in _dirs(partial, whole, source):
            await conn.makedirs(d)
    changed = [e for e in entries if base.get(_rel(e, source)) != wanted[_rel(e, source)]]

    limit = asyncio.Semaphore(_PARALLEL_WRITES)

    async def put(e: Entry) -> None:
        dest = posixpath.join(partial, _rel(e, source))
        async with limit:
            if e.kind == "file" and e.size >= _STREAM_MIN:
                sent = await _stream(conn, tree, e, dest)  # not `+= await`: others add to it meanwhile
                wire.sent["files"] += sent
                return
            data = await asyncio.to_thread(tree.read, e.path)
            # a copy of the previous release's file is replaced, never edited
            if e.kind == "symlink":
                await conn.replace_symlink(data.decode(), dest)  # target validated to stay inside the source
            else:
                await conn.replace_file(dest, data, _file_mode(e))
            wire.sent["files"] += len(data)

    async def put_all(es: list[Entry]) -> None:
        await asyncio.gather(*(put(e) for e in es))

    (rebuilt, fallback, failed), _ = await asyncio.gather(
        _send_deltas(wire, tree, partial, source, batches, hashing), put_all(whole))
    await put_all(fallback)
    await wire.run(["sh", "-c", _INSTALL, "sh", partial, ctx.release_dir])
    # Written last (atomically): a manifest on the host means its release directory is complete.
    await _write_manifest(wire, manifest_path(ctx), wanted,
                          manifest_path(ctx, previous) if previous else None, prev_manifest)
    return {
        "files_total": len(wanted),
        "files_sent": len(changed),
        "files_delta": len(rebuilt),
        "delta_failed": failed,
        "files_removed": len(gone),
        "bytes_sent": sum(wire.sent.values()),
        "bytes_sent_detail": dict(wire.sent),
        "bytes_received_hashes": wire.received_hashes,
        "delta_from": previous if base else None,
    }

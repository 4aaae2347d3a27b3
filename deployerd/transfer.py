"""Transfer phase: the service's source at the pinned commit into a release directory, over SFTP.

Only what changed since the previous release crosses the network: the previous release directory is copied
on the host (a local copy, no network), then the files whose blob hash differs are written over SFTP and
the ones that disappeared are removed. Everything lands in ``<release>.partial`` and is renamed into place
at the end, so a crash mid-transfer never leaves a half-written release that looks complete.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from typing import Any

from deployerd.connection import Connection
from deployerd.runtimes.base import ReleaseContext
from deployerd.tree import Entry, Tree

_PARALLEL_WRITES = 16


def manifest_path(ctx: ReleaseContext, release: str | None = None) -> str:
    return posixpath.join(ctx.service_dir, "releases", f"{release or ctx.release.id}.manifest.json")


def _rel(e: Entry, prefix: str) -> str:
    return posixpath.relpath(e.path, prefix)


def _manifest(entries: list[Entry], prefix: str) -> dict[str, list[Any]]:
    return {_rel(e, prefix): [e.kind, e.mode, e.sha] for e in entries}


async def _read_manifest(conn: Connection, path: str) -> dict[str, list[Any]] | None:
    try:
        return json.loads(await conn.read_bytes(path))
    except Exception:  # absent or unreadable: treat as no previous release
        return None


async def transfer(conn: Connection, tree: Tree, ctx: ReleaseContext, previous: str | None) -> dict[str, Any]:
    """Make ``ctx.release_dir`` hold exactly the source folder at the commit; returns what was sent."""
    source = ctx.spec.source.rstrip("/")
    entries = [e for e in await asyncio.to_thread(tree.entries, source) if e.kind != "other"]
    wanted = _manifest(entries, source)
    have = await _read_manifest(conn, manifest_path(ctx))
    if have == wanted and (await conn.run(["test", "-d", ctx.release_dir], check=False)).exit_status == 0:
        return {"files_total": len(wanted), "files_sent": 0, "bytes_sent": 0, "reused": "release already on host"}

    prev_manifest = await _read_manifest(conn, manifest_path(ctx, previous)) if previous else None
    partial = ctx.release_dir + ".partial"
    await conn.run(["rm", "-rf", "--", partial])
    await conn.makedirs(posixpath.dirname(partial))
    base: dict[str, list[Any]] = {}
    if prev_manifest is not None:
        prev_dir = posixpath.join(ctx.service_dir, "releases", previous or "")
        copied = await conn.run(["cp", "-a", "--", prev_dir, partial], check=False)
        if copied.exit_status == 0:
            base = prev_manifest
    if not base:
        await conn.makedirs(partial)

    changed = [e for e in entries if base.get(_rel(e, source)) != wanted[_rel(e, source)]]
    gone = [p for p in base if p not in wanted]
    sftp = await conn.sftp()
    dirs = sorted({posixpath.dirname(posixpath.join(partial, _rel(e, source))) for e in changed})
    for d in dirs:
        await sftp.makedirs(d, exist_ok=True)
    if gone:
        await conn.run(["rm", "-rf", "--", *(posixpath.join(partial, p) for p in gone)])

    sent = 0
    limit = asyncio.Semaphore(_PARALLEL_WRITES)

    async def put(e: Entry) -> None:
        nonlocal sent
        dest = posixpath.join(partial, _rel(e, source))
        async with limit:
            data = await asyncio.to_thread(tree.read, e.path)
            if await sftp.lexists(dest):  # a hard copy of the previous release's file: replace, never edit
                await sftp.remove(dest)
            if e.kind == "symlink":
                await sftp.symlink(data.decode(), dest)  # target validated to stay inside the source
            else:
                async with sftp.open(dest, "wb") as f:
                    await f.write(data)
                await sftp.chmod(dest, 0o755 if e.mode & 0o111 else 0o644)
            sent += len(data)

    await asyncio.gather(*(put(e) for e in changed))
    await conn.run(["rm", "-rf", "--", ctx.release_dir])
    await conn.run(["mv", "-T", "--", partial, ctx.release_dir])
    # Written last (atomically): a manifest on the host means its release directory is complete.
    await conn.put_bytes(manifest_path(ctx), json.dumps(wanted, sort_keys=True).encode(), mode=0o644)
    return {
        "files_total": len(wanted),
        "files_sent": len(changed),
        "files_removed": len(gone),
        "bytes_sent": sent,
        "delta_from": previous if base else None,
    }

"""Transfer with block deltas on a real host: what lands equals the local files byte for byte, only the
changed blocks (plus the remote steps' scripts) cross the network, and the previous release stays as it was."""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
import secrets
import shlex
from pathlib import Path

import pytest

from deployerd import delta
from deployerd.connection import Connection
from deployerd.desired import HostSpec, Release, ServiceSpec
from deployerd.runtimes.base import ReleaseContext
from deployerd.transfer import DELTA_MIN_SIZE, manifest_path, transfer
from deployerd.tree import DirTree

pytestmark = pytest.mark.e2e

MiB, KiB = 1024 * 1024, 1024


def context(host: str, base_dir: str, release: str) -> ReleaseContext:
    spec = ServiceSpec(name="delta", host=host, port=8999, source="svc")
    return ReleaseContext(spec=spec, host=HostSpec(name=host, address="127.0.0.1", base_dir=base_dir),
                          release=Release(id=release, inputs={}), commit="c" * 40)


async def host_sums(conn: Connection, d: str) -> dict[str, str]:
    out = await conn.run(["find", d, "-type", "f", "-exec", "sha256sum", "{}", "+"])
    return {posixpath.relpath(p, d): s for s, p in (line.split(None, 1) for line in out.stdout.splitlines())}


def local_sums(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


async def test_changed_files_cross_as_block_deltas(conn: Connection, tmp_path: Path) -> None:
    rnd = random.Random(3)
    src = tmp_path / "svc"
    (src / "data").mkdir(parents=True)
    files = {"data/big.bin": rnd.randbytes(2 * MiB), "data/mid.bin": rnd.randbytes(100 * KiB),
             "data/grow.bin": rnd.randbytes(50 * KiB), "data/shrink.bin": rnd.randbytes(64 * KiB),
             "data/perm.bin": rnd.randbytes(64 * KiB), "run.sh": b"#!/bin/sh\n" + rnd.randbytes(20 * KiB),
             "small.txt": b"hello\n", "same.bin": rnd.randbytes(30 * KiB)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    (src / "run.sh").chmod(0o755)
    base = f"/opt/deployerd-test-delta-{secrets.token_hex(4)}"
    try:
        first = await transfer(conn, DirTree(tmp_path), context(conn.host.name, base, "r1"), None)
        assert first["files_delta"] == 0 and first["bytes_sent"] >= sum(map(len, files.values()))
        r1 = posixpath.join(base, "delta", "releases", "r1")
        before = await host_sums(conn, r1)
        assert before == local_sums(src)

        # the second release: 16 bytes changed in place in the 2 MiB and the 100 KiB files and in run.sh,
        # an append, a truncation, whole blocks permuted, a small file changed (sent whole), one file unchanged
        changed_blocks = {}
        for rel, at in (("data/big.bin", 1 * MiB + 5), ("data/mid.bin", 40 * KiB), ("run.sh", 3)):
            data = bytearray(files[rel])
            data[at:at + 16] = secrets.token_bytes(16)
            (src / rel).write_bytes(data)
            changed_blocks[rel] = 2  # 16 bytes touch at most 2 blocks
        (src / "data/grow.bin").write_bytes(files["data/grow.bin"] + rnd.randbytes(3000))
        changed_blocks["data/grow.bin"] = 1 + -(-3000 // delta.block_size(50 * KiB + 3000))  # old short tail + new
        (src / "data/shrink.bin").write_bytes(files["data/shrink.bin"][:40 * KiB + 77])
        changed_blocks["data/shrink.bin"] = 1
        bs = delta.block_size(64 * KiB)
        assert (64 * KiB) % bs == 0
        blocks = [files["data/perm.bin"][i:i + bs] for i in range(0, 64 * KiB, bs)]
        rnd.shuffle(blocks)
        (src / "data/perm.bin").write_bytes(b"".join(blocks))
        changed_blocks["data/perm.bin"] = 0
        (src / "small.txt").write_bytes(b"hello again\n")

        ctx2 = context(conn.host.name, base, "r2")
        second = await transfer(conn, DirTree(tmp_path), ctx2, "r1")
        print("second transfer:", second)
        assert second["delta_failed"] == [] and second["files_delta"] == 6 and second["files_sent"] == 7
        assert await host_sums(conn, ctx2.release_dir) == local_sums(src)
        modes = await conn.run(["stat", "-c", "%a %n", "--", *(posixpath.join(ctx2.release_dir, p)
                                                                 for p in ("run.sh", "data/mid.bin"))])
        assert [line.split()[0] for line in modes.stdout.splitlines()] == ["755", "644"]
        assert await host_sums(conn, r1) == before  # the previous release is untouched

        # the bound, from block counts: literal blocks + per-file framing + the scripts and paths once
        literal = sum(n * delta.block_size((src / rel).stat().st_size) for rel, n in changed_blocks.items())
        framing = len(changed_blocks) * (delta.HEADER.size + 4 * delta.COPY.size + 2 * delta.LITERAL.size)
        scripts = sum(len(shlex.quote(s)) for s in (delta.SIGNATURE_SCRIPT, delta.APPLY_SCRIPT, delta.MANIFEST_SCRIPT))
        detail = second["bytes_sent_detail"]
        assert detail["delta"] <= literal + framing, detail
        assert detail["files"] == len(b"hello again\n")
        bound = literal + framing + scripts + 4 * KiB  # paths, fixed commands (rm, cp, mv), the manifest patch
        assert second["bytes_sent"] <= bound, (second, bound)
        assert bound < (100 * KiB) // 2  # the bound itself is tight: a fraction of even the 100 KiB file

        # the manifest was written as a patch and is exact: the same release again is found complete
        want = {str(p.relative_to(src)): None for p in src.rglob("*") if p.is_file()}
        on_host = json.loads((await conn.run(["cat", manifest_path(ctx2)])).stdout)
        assert set(on_host) == set(want) and detail.get("manifest", 0) < 1 * KiB
        again = await transfer(conn, DirTree(tmp_path), ctx2, "r1")
        assert again.get("reused") == "release already on host"
    finally:
        await conn.run(["rm", "-rf", "--", base])


async def test_a_file_the_host_cannot_read_is_sent_whole(conn: Connection, tmp_path: Path) -> None:
    """The host's copy became a symlink (never followed): no delta, a whole write, the right bytes."""
    src = tmp_path / "svc"
    src.mkdir()
    data = random.Random(5).randbytes(4 * DELTA_MIN_SIZE)
    (src / "f.bin").write_bytes(data)
    base = f"/opt/deployerd-test-delta-{secrets.token_hex(4)}"
    try:
        await transfer(conn, DirTree(tmp_path), context(conn.host.name, base, "r1"), None)
        r1 = posixpath.join(base, "delta", "releases", "r1")
        await conn.run(["ln", "-sfn", "/etc/hostname", posixpath.join(r1, "f.bin")])
        (src / "f.bin").write_bytes(data[:-1] + b"!")
        ctx2 = context(conn.host.name, base, "r2")
        out = await transfer(conn, DirTree(tmp_path), ctx2, "r1")
        assert out["files_delta"] == 0 and out["bytes_sent_detail"]["files"] == len(data)
        assert await host_sums(conn, ctx2.release_dir) == local_sums(src)
    finally:
        await conn.run(["rm", "-rf", "--", base])


async def test_removed_files_and_a_file_turned_folder_land_exactly(conn: Connection, tmp_path: Path) -> None:
    """The one prepare step removes what went (a file whose path becomes a folder too) and makes the new folders;
    a previous release that cannot be copied (removed by hand) makes every file go whole, still exact."""
    src = tmp_path / "svc"
    (src / "old" / "deep").mkdir(parents=True)
    for rel in ("keep.txt", "a", "old/x.txt", "old/deep/y.txt", "name with space.txt"):
        (src / rel).write_text(f"{rel}\n")
    base = f"/opt/deployerd-test-delta-{secrets.token_hex(4)}"
    try:
        await transfer(conn, DirTree(tmp_path), context(conn.host.name, base, "r1"), None)
        (src / "a").unlink()
        (src / "a").mkdir()
        (src / "a" / "b.txt").write_text("now a folder\n")
        for rel in ("old/x.txt", "old/deep/y.txt", "name with space.txt"):
            (src / rel).unlink()
        (src / "new" / "n1" / "n2").mkdir(parents=True)
        (src / "new" / "n1" / "n2" / "z.txt").write_text("z\n")
        ctx2 = context(conn.host.name, base, "r2")
        out = await transfer(conn, DirTree(tmp_path), ctx2, "r1")
        assert out["files_removed"] == 4 and out["delta_from"] == "r1", out
        assert await host_sums(conn, ctx2.release_dir) == local_sums(src)
        kinds = await conn.run(["stat", "-c", "%F", "--", posixpath.join(ctx2.release_dir, "a")])
        assert kinds.stdout.strip() == "directory"
        await conn.run(["rm", "-rf", "--", ctx2.release_dir, manifest_path(ctx2)])
        await conn.run(["rm", "-rf", "--", context(conn.host.name, base, "r1").release_dir])
        again = await transfer(conn, DirTree(tmp_path), ctx2, "r1")  # r1's manifest is left, its folder is not
        assert again["delta_from"] is None and again["files_sent"] == 3, again
        assert await host_sums(conn, ctx2.release_dir) == local_sums(src)
    finally:
        await conn.run(["rm", "-rf", "--", base])

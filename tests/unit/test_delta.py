"""Block deltas: block matching, the wire format, and the remote scripts themselves (run here by python3)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from property_profiles import examples

from deployerd import delta
from deployerd.delta import Copy, Literal

BS = 512


def rnd(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def rebuild(old: bytes, new: bytes, bs: int = BS) -> tuple[list[delta.Op], bytes]:
    ops = delta.plan(new, bs, delta.digests(old, bs))
    frame = delta.encode(new, bs, 0o644, ops)
    assert delta.apply(old, frame) == new
    return ops, frame


def test_block_size_grows_with_the_file_and_is_clamped() -> None:
    assert delta.block_size(0) == delta.MIN_BLOCK
    assert delta.block_size(8 * 1024) == delta.MIN_BLOCK
    assert delta.block_size(100 * 1024) == 1280  # sqrt(16 * 100 KiB), a multiple of 64
    assert delta.block_size(2 * 1024 * 1024) == 5824
    assert delta.block_size(10**12) == delta.MAX_BLOCK


def test_unchanged_file_is_one_copy() -> None:
    old = rnd(10 * BS + 7)
    ops, _ = rebuild(old, old)
    assert ops == [Copy(0, 11)]


def test_in_place_edit_sends_only_the_edited_block() -> None:
    old = rnd(20 * BS)
    new = bytearray(old)
    new[5 * BS + 3:5 * BS + 19] = b"x" * 16
    ops, frame = rebuild(old, bytes(new))
    assert ops == [Copy(0, 5), Literal(bytes(new[5 * BS:6 * BS])), Copy(6, 14)]
    assert len(frame) == delta.HEADER.size + 2 * delta.COPY.size + delta.LITERAL.size + BS


def test_append_and_truncate() -> None:
    old = rnd(10 * BS + 100)
    ops, _ = rebuild(old, old + b"tail" * 300)
    assert ops[0] == Copy(0, 10) and delta.literal_bytes(ops) == 100 + 1200  # the old short block is resent
    ops, _ = rebuild(old, old[: 4 * BS + 9])
    assert ops == [Copy(0, 4), Literal(old[4 * BS: 4 * BS + 9])]
    ops, _ = rebuild(old, old[: 4 * BS])  # at a block boundary: nothing literal
    assert ops == [Copy(0, 4)]


def test_block_aligned_moves_are_copies() -> None:
    old = rnd(8 * BS)
    order = [3, 4, 5, 0, 1, 2, 7, 6]
    new = b"".join(old[i * BS:(i + 1) * BS] for i in order)
    ops, _ = rebuild(old, new)
    assert ops == [Copy(3, 3), Copy(0, 3), Copy(7, 1), Copy(6, 1)]
    assert delta.literal_bytes(ops) == 0


def test_a_repeated_block_continues_the_current_run() -> None:
    block = b"z" * BS
    old = rnd(BS, 2) + block + rnd(BS, 3) + block + rnd(BS, 4)
    ops, _ = rebuild(old, old)
    assert ops == [Copy(0, 5)]  # not Copy(0, 3), Copy(1, 1), ...


def test_a_shifting_insertion_sends_the_rest_literally() -> None:
    """The documented limit of fixed blocks: everything after an unaligned insertion is literal."""
    old = rnd(10 * BS)
    new = old[: 2 * BS] + b"!" + old[2 * BS:]
    ops, _ = rebuild(old, new)
    assert ops[0] == Copy(0, 2) and delta.literal_bytes(ops) == len(new) - 2 * BS


def test_empty_files() -> None:
    assert rebuild(rnd(3 * BS), b"")[0] == []
    assert rebuild(b"", b"abc")[0] == [Literal(b"abc")]


def test_apply_refuses_a_frame_built_for_another_file() -> None:
    old = rnd(6 * BS)
    new = old[:BS] + b"changed" + old[BS + 7:]
    frame = delta.encode(new, BS, 0o644, delta.plan(new, BS, delta.digests(old, BS)))
    with pytest.raises(ValueError):
        delta.apply(rnd(6 * BS, 9), frame)


@settings(max_examples=examples(60), deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 6000),
       edits=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 40), st.binary(max_size=40)), max_size=5))
def test_any_edit_rebuilds_exactly(seed: int, size: int, edits: list[tuple[int, int, bytes]]) -> None:
    old = rnd(size, seed)
    new = bytearray(old)
    for at, cut, ins in edits:
        at = min(at, len(new))
        new[at:at + cut] = ins
    ops, frame = rebuild(old, bytes(new), 256)
    assert len(frame) <= delta.HEADER.size + len(new) + 9 * len(ops)


# --- the remote scripts, run by a local python3 exactly as the host runs them ---------------------------------


def run(script: str, *argv: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", script, *argv], input=input, capture_output=True, timeout=60,
                          check=False)


def test_signature_script_hashes_blocks_like_the_daemon(tmp_path: Path) -> None:
    data = rnd(5000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "e").write_bytes(b"")
    os.symlink("a", tmp_path / "link")
    out = run(delta.SIGNATURE_SCRIPT, str(tmp_path), "a", "1024", "missing", "512", "e", "512", "link", "512")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert base64.b64decode(lines[0][1:]) == b"".join(delta.digests(data, 1024))
    assert lines[1:] == ["-", "+", "-"]  # absent; empty; a symlink is never followed


def test_apply_script_builds_new_inodes_and_verifies(tmp_path: Path) -> None:
    prev, part = tmp_path / "prev", tmp_path / "part"
    prev.mkdir()
    part.mkdir()
    olds = {"a": rnd(9000, 1), "b": rnd(9000, 2), "c": rnd(9000, 3)}
    for name, data in olds.items():
        (prev / name).write_bytes(data)
        os.link(prev / name, part / name)  # the partial release shares the previous release's inodes
    news = {"a": olds["a"][:100] + b"new" + olds["a"][103:], "b": olds["b"] + b"more",
            "c": olds["b"][:100] + b"x" + olds["b"][101:]}
    frames = {}
    for name, new in news.items():
        basis = olds[name] if name != "c" else olds["b"]  # c's frame is built against the wrong file
        frames[name] = delta.encode(new, BS, 0o755, delta.plan(new, BS, delta.digests(basis, BS)))
    out = run(delta.APPLY_SCRIPT, str(part), "a", "b", "c", input=b"".join(frames.values()))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().splitlines() == ["ok", "ok", "bad"]
    for name in ("a", "b"):
        assert (part / name).read_bytes() == news[name]
        assert (part / name).stat().st_ino != (prev / name).stat().st_ino
        assert (part / name).stat().st_mode & 0o777 == 0o755
    for name, data in olds.items():
        assert (prev / name).read_bytes() == data  # the previous release is untouched
    assert (part / "c").read_bytes() == olds["c"]  # a failed file is left as it was, for a whole write
    assert sorted(os.listdir(part)) == ["a", "b", "c"]  # no temp file left behind


def test_apply_script_reports_a_missing_basis_and_goes_on(tmp_path: Path) -> None:
    new = rnd(3000)
    (tmp_path / "b").write_bytes(new[:2000])
    frames = [delta.encode(new, BS, 0o644, [Literal(new)]),
              delta.encode(new, BS, 0o644, delta.plan(new, BS, delta.digests(new[:2000], BS)))]
    out = run(delta.APPLY_SCRIPT, str(tmp_path), "a", "b", input=b"".join(frames))
    assert out.stdout.decode().splitlines() == ["err FileNotFoundError", "ok"]
    assert (tmp_path / "b").read_bytes() == new and not (tmp_path / "a").exists()


def test_manifest_script_patches_to_the_exact_bytes(tmp_path: Path) -> None:
    old = {"a": ["file", 33188, "1" * 40], "b": ["file", 33261, "2" * 40], "c": ["symlink", 40960, "3" * 40]}
    new = {"a": ["file", 33188, "9" * 40], "c": old["c"], "d/e": ["file", 33188, "4" * 40]}
    text = json.dumps(new, sort_keys=True).encode()
    (tmp_path / "old.json").write_text(json.dumps(old, sort_keys=True))
    patch = {"set": {"a": new["a"], "d/e": new["d/e"]}, "del": ["b"], "sha256": hashlib.sha256(text).hexdigest()}
    out = run(delta.MANIFEST_SCRIPT, str(tmp_path / "old.json"), str(tmp_path / "new.json"),
              input=json.dumps(patch).encode())
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "new.json").read_bytes() == text
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    patch["sha256"] = "0" * 64
    out = run(delta.MANIFEST_SCRIPT, str(tmp_path / "old.json"), str(tmp_path / "bad.json"),
              input=json.dumps(patch).encode())
    assert out.returncode == 3 and not (tmp_path / "bad.json").exists()


@given(st.binary(max_size=6000), st.binary(max_size=6000), st.integers(min_value=1, max_value=700))
@settings(max_examples=examples(200), deadline=None)
def test_plan_over_a_stream_of_blocks_is_plan(old: bytes, new: bytes, bs: int) -> None:
    """plan_blocks (the new file read block by block, never whole) plans what plan plans; literal_max stops it
    once the literal bytes pass the bound."""
    hashes = delta.digests(old, bs)
    ops = delta.plan(new, bs, hashes)
    assert delta.plan_blocks((new[i:i + bs] for i in range(0, len(new), bs)), hashes) == ops
    literal = delta.literal_bytes(ops)
    blocks = [new[i:i + bs] for i in range(0, len(new), bs)]
    assert delta.plan_blocks(iter(blocks), hashes, literal_max=literal) == ops
    if literal:
        assert delta.plan_blocks(iter(blocks), hashes, literal_max=literal - 1) is None
    sha = hashlib.sha256(new).digest()
    assert delta.encode_ops(sha, len(new), bs, 0o644, ops) == delta.encode(new, bs, 0o644, ops)

"""deployerd.memory on this machine's glibc: the arena cap is accepted and trim gives freed pages back."""

from __future__ import annotations

from deployerd import memory


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def test_limit_arenas_is_accepted_by_glibc() -> None:
    assert memory.limit_arenas(2) is True


def test_trim_returns_freed_heap_pages_to_the_kernel() -> None:
    # 64 MiB in 4 KiB blocks (malloc, not pymalloc; below the mmap threshold), every 64th kept so that
    # free() alone cannot shrink the heap: the pages in between stay resident until trimmed.
    blocks = [bytearray(4096) for _ in range(16384)]
    for b in blocks:
        b[::512] = b"\1" * 8  # touch every page
    kept = blocks[::64]
    del blocks
    before = _rss_kib()
    assert memory.trim() is True
    after = _rss_kib()
    assert before - after > 32 * 1024, (before, after)
    assert len(kept) == 256

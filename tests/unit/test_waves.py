"""Waves of a fleet rollout: canary first, then batches (a number or a percentage of the placed hosts)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployerd.waves import batch_size, label, wave_of, waves

H = [f"h{i}" for i in range(1, 7)]


@pytest.mark.parametrize(("changing", "canary", "batch", "placed", "fresh", "expected"), [
    (H, 1, 2, 6, (), [(0, ["h1"]), (1, ["h2", "h3"]), (2, ["h4", "h5"]), (3, ["h6"])]),
    (H, 0, 2, 6, (), [(1, ["h1", "h2"]), (2, ["h3", "h4"]), (3, ["h5", "h6"])]),
    (H, 2, "50%", 6, (), [(0, ["h1", "h2"]), (1, ["h3", "h4", "h5"]), (2, ["h6"])]),
    (H[:4], 1, "30%", 4, (), [(0, ["h1"]), (1, ["h2", "h3"]), (2, ["h4"])]),  # 30% of 4: 1.2, rounded up
    (H[:3], 1, "1%", 3, (), [(0, ["h1"]), (1, ["h2"]), (2, ["h3"])]),  # at least one host
    (H[:3], 1, "100%", 3, (), [(0, ["h1"]), (1, ["h2", "h3"])]),
    (H[:3], 5, 1, 3, (), [(0, ["h1", "h2", "h3"])]),  # a canary larger than the change: one wave
    (["h2", "h5"], 1, 2, 6, (), [(0, ["h2"]), (1, ["h5"])]),  # only the hosts that change
    (H[:4], 1, 2, 4, {"h3", "h4"}, [(0, ["h3"]), (1, ["h4", "h1"]), (2, ["h2"])]),  # new hosts first
    ([], 1, 2, 6, (), []),
])
def test_waves(changing: list[str], canary: int, batch: int | str, placed: int, fresh: set[str],
               expected: list[tuple[int, list[str]]]) -> None:
    assert waves(changing, canary, batch, placed, fresh) == expected


def test_labels_and_batch_size() -> None:
    assert (label(0), label(1), label(2)) == ("canary", "wave 1", "wave 2")
    assert (batch_size(3, 10), batch_size("25%", 10), batch_size("10%", 3)) == (3, 3, 1)


@given(n=st.integers(0, 30), placed_extra=st.integers(0, 10), canary=st.integers(0, 5),
       batch=st.one_of(st.integers(1, 8), st.integers(1, 100).map(lambda p: f"{p}%")),
       fresh_bits=st.integers(0, 2**30))
def test_every_changing_host_in_exactly_one_wave_fresh_first(n: int, placed_extra: int, canary: int,
                                                               batch: int | str, fresh_bits: int) -> None:
    changing = [f"h{i}" for i in range(n)]
    fresh = {h for i, h in enumerate(changing) if fresh_bits >> i & 1}
    out = waves(changing, canary, batch, n + placed_extra, fresh)
    flat = [h for _, hosts in out for h in hosts]
    assert sorted(flat) == sorted(changing)
    assert flat == [h for h in changing if h in fresh] + [h for h in changing if h not in fresh]
    numbers = [w for w, _ in out]
    assert numbers == list(range(0 if canary and n else 1, len(out) + (0 if canary and n else 1)))
    size = batch_size(batch, n + placed_extra)
    assert all(0 < len(hosts) <= (min(canary, n) if w == 0 else size) for w, hosts in out)
    assert wave_of(changing, canary, batch, n + placed_extra, fresh) == {h: w for w, hs in out for h in hs}

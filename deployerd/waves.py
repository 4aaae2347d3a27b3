"""The waves of a fleet's rollout: which of the hosts that need a change go together, the canary first.

Pure (no I/O), so each rule is a table test. Wave 0 is the canary (``canary`` hosts; with ``canary: 0`` there
is none), then batches numbered from 1 of ``batch`` hosts each: a number, or "N%" of the hosts the service is
placed on, rounded up and at least 1. Hosts with no instance of the service yet go first (an added host, or a
move from another host, serves the new release before any host that serves now is touched), then the rest in
placement order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

CANARY = 0  # the canary wave's number; batches count from 1 whatever the canary


def batch_size(batch: int | str, placed: int) -> int:
    """Hosts per batch: ``batch`` itself, or its percentage of the ``placed`` hosts rounded up (at least 1)."""
    if isinstance(batch, str):
        return max(1, -(-placed * int(batch.rstrip("%")) // 100))
    return max(1, batch)


def waves(changing: Sequence[str], canary: int, batch: int | str, placed: int,
          fresh: Collection[str] = ()) -> list[tuple[int, list[str]]]:
    """(wave number, its hosts) in the order they run, for the ``changing`` hosts (in placement order);
    ``fresh``: those of them with no instance yet, which go first."""
    order = [h for h in changing if h in fresh] + [h for h in changing if h not in fresh]
    out: list[tuple[int, list[str]]] = []
    if canary > 0 and order:
        out.append((CANARY, order[:canary]))
        order = order[canary:]
    size = batch_size(batch, placed)
    out += [(n, order[i:i + size]) for n, i in enumerate(range(0, len(order), size), start=1)]
    return out


def wave_of(changing: Sequence[str], canary: int, batch: int | str, placed: int,
            fresh: Collection[str] = ()) -> dict[str, int]:
    """host -> the number of the wave it is deployed in (see `waves`)."""
    return {host: n for n, hosts in waves(changing, canary, batch, placed, fresh) for host in hosts}


def label(wave: int) -> str:
    """How ``deployerd plan`` names a wave: ``canary``, ``wave 2``."""
    return "canary" if wave == CANARY else f"wave {wave}"

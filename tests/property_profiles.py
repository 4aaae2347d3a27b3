"""Hypothesis profiles: the same examples on every run in CI and ``make test``, new ones under ``make fuzz``.

``DEPLOYERD_HYPOTHESIS_PROFILE`` picks the profile (``ci`` when ``CI`` is set, Hypothesis's default
otherwise); ``DEPLOYERD_FUZZ_FACTOR`` multiplies every property test's number of examples (``examples``).
A failure under ``fuzz`` prints its reproduction blob; add the case it found as an ``@example``.
"""

from __future__ import annotations

import os

from hypothesis import settings

FUZZ_FACTOR = max(1, int(os.environ.get("DEPLOYERD_FUZZ_FACTOR", "1")))

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)


def load() -> str:
    """Load the profile the environment asks for (before any test module builds its settings)."""
    name = os.environ.get("DEPLOYERD_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
    settings.load_profile(name)
    return name


def examples(n: int) -> int:
    """A property test's number of examples: ``n``, times the fuzz factor."""
    return n * FUZZ_FACTOR

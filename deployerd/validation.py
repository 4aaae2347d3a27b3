"""Validation failures of the desired-state files as ``ManifestError``s naming the file, the field and why.

Shared by the loader (``desired.py``) and the Swarm clusters' rules (``clusters.py``): pydantic's errors become
dotted field paths with plain reasons, and a key that could forge a log line is shown quoted.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from deployerd.schema import ManifestError


class Invalid(Exception):
    """One or more ManifestErrors: the file (or service) they name is refused."""

    def __init__(self, errors: list[ManifestError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


REASONS = {
    "extra_forbidden": "unknown field",
    "missing": "required field missing",
    "string_type": "must be a string (quote numbers and booleans in YAML)",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
}


def key_name(key: Any) -> str:
    """A key as a field name: an empty or unprintable key (newline, control, bidi) is shown quoted and
    escaped, so the field is never blank and never forges a line in a log or the CLI."""
    text = str(key)
    return text if text and text.isprintable() else json.dumps(text)


def translate(file: str, exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[ManifestError]:
    """Pydantic errors -> ManifestErrors with dotted field paths and plain reasons."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [key_name(p) for p in (*prefix, *err["loc"]) if p != "[key]"]
        is_key = "[key]" in err["loc"]
        kind = err["type"]
        if kind == "value_error":
            reason = str(err.get("ctx", {}).get("error", err["msg"]))
        elif is_key and kind == "string_type":
            reason = "keys must be strings"
        else:
            reason = REASONS.get(kind) or err["msg"].replace("Input should be", "must be")
        out.append(ManifestError(file=file, field=".".join(loc)[:200], reason=reason))
    return out

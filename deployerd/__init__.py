"""deployerd: a GitOps deployment daemon for servers reached over SSH."""

import sys

# httpx imports its own command-line tool (rich, pygments, click: about 3 MB resident) whenever those
# packages are installed, which typer makes sure they are. deployerd never runs httpx's CLI; an entry of
# None makes httpx's guarded ``from ._main import main`` take its fallback instead.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

__version__ = "0.1.0"

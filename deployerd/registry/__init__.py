"""The embedded Registry: the ecosystem's droplet catalogue, persisted in SQLite.

Public face: :func:`create_app` (the FastAPI app), :func:`serve` (foreground, uvicorn),
:func:`serving` / :func:`serving_app` (in the current event loop, for tests and embedding), :func:`read_token`.
"""

from deployerd.registry.server import TOKEN_ENV, create_app, read_token, require_bearer, serve, serving, serving_app
from deployerd.registry.store import Droplet, DropletStore

__all__ = [
    "TOKEN_ENV", "Droplet", "DropletStore", "create_app", "read_token", "require_bearer", "serve", "serving",
    "serving_app",
]

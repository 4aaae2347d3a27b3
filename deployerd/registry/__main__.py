"""``python -m deployerd.registry serve --db PATH [--host H] [--port P] [--token-file F]``.

The token comes from --token-file or env DEPLOYERD_REGISTRY_TOKEN; there is deliberately no --token
(argv is visible to every local user).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from deployerd.registry.server import TOKEN_ENV, read_token, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployerd.registry", description="The embedded Registry.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve the Registry HTTP API")
    run.add_argument("--db", type=Path, required=True, help="SQLite file (created if absent)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--token-file", type=Path, help=f"file holding the write token (else env {TOKEN_ENV})")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the token: {exc}", file=sys.stderr)
        return 2
    serve(args.db, host=args.host, port=args.port, token=token)
    return 0


if __name__ == "__main__":
    sys.exit(main())

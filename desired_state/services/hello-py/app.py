"""A tiny Python web service run by a systemd unit (standard library only: the hosts need no network)."""

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "1"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            body = json.dumps({"status": "active", "service": "hello-py", "version": VERSION}).encode()
            kind = "application/json"
        else:
            body = f"<h1>{os.environ.get('GREETING', 'hello')}</h1>\n".encode()
            kind = "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")  # 127.0.0.1 behind the host's ingress proxy
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()

"""A loopback HTTP server for offline runs (demo, tests, benchmarks): serves a folder on 127.0.0.1."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar


class _Handler(SimpleHTTPRequestHandler):
    extra_headers: ClassVar[dict[str, dict[str, str]]] = {}

    def end_headers(self) -> None:
        for name, value in self.extra_headers.get(self.path, {}).items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_folder(folder: Path, headers: dict[str, dict[str, str]] | None = None) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 at a random free port; yields the base URL; stops the server on exit.

    `headers` maps a URL path (e.g. "/noai.jpg") to extra response headers (e.g. X-Robots-Tag)."""
    handler_cls = type("Handler", (_Handler,), {"extra_headers": dict(headers or {})})
    handler = functools.partial(handler_cls, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="loopback-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

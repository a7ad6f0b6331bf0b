"""Serve metrics in the Prometheus text format over HTTP (stdlib only).

Scrapes run on the HTTP server's thread and only *read* the Metrics objects
(plain dicts of ints): a scrape racing an increment sees the value before or
after it, which is all Prometheus asks for; no socket of a pattern is touched.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable

from ._errors import ConnectError
from ._metrics import Metrics, render_prometheus

__all__ = ["MetricsServer"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """`GET /metrics` on `host:port` (port 0 picks a free one; see `.port`)."""

    def __init__(
        self, collect: Callable[[], list[Metrics]], port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render_prometheus(collect()).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood the log

        try:
            self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConnectError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="zmqmesh-metrics"
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

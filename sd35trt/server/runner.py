"""Running the app on uvicorn: in the foreground (`sd35trt serve`) or on a background thread of an
embedding service (`BackgroundServer`).

Shutdown is graceful either way: readiness turns 503 at once, uvicorn stops accepting connections
and waits for the requests in progress, then the app's lifespan drains the micro-batcher (queued
and running jobs finish) and frees the model.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port; read the port from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, marking the app as draining the moment an exit is asked for."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    def request_exit(self) -> None:
        self._on_exit()
        self.should_exit = True


def _config(app: FastAPI, log_level: str, own_logging: bool) -> uvicorn.Config:
    """timeout_graceful_shutdown=None: wait for every request in progress, however long it takes.
    Embedded (own_logging=False), uvicorn leaves the host process's logging configuration alone."""
    kw: dict[str, Any] = {} if own_logging else {"log_config": None}
    return uvicorn.Config(app, lifespan="on", log_level=log_level, timeout_graceful_shutdown=None,
                          access_log=log_level == "debug", **kw)


def run(app: FastAPI, sock: socket.socket, log_level: str = "info", exit_on_load_failure: bool = False) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers, main thread only), then shut down gracefully.
    `exit_on_load_failure`: stop as soon as the model fails to load (`sd35trt serve` then exits
    non-zero); otherwise the server stays up and /readyz reports the failure."""
    server = _Server(_config(app, log_level, own_logging=True), app.state.host.begin_drain)
    if exit_on_load_failure:
        app.state.host.on_failure = server.request_exit
    server.run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(create_app(settings)) as srv: httpx.get(srv.url + "/readyz")`.

    Runs uvicorn on its own thread and event loop, bound to `host` (default 127.0.0.1) and `port`
    (default 0: a free port). `stop()` shuts down gracefully and waits for the thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self._sock = bind(host, port)
        addr = self._sock.getsockname()
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{addr[1]}"
        self._server = _Server(_config(app, log_level, own_logging=False), app.state.host.begin_drain)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="sd35trt-server", daemon=True)

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: requests in progress and queued jobs finish first (up to `timeout_s`)."""
        self._server.request_exit()
        self._thread.join(timeout_s)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not stop within {timeout_s:g} s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

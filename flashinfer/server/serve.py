"""Run the app under uvicorn on a socket we bind ourselves: a port in use becomes one clear
error line (uvicorn would log it and exit 1), and port 0 gives a free port to tests."""

from __future__ import annotations

import logging
import socket

import uvicorn

from flashinfer.engine import Engine
from flashinfer.errors import FlashinferError
from flashinfer.server.app import DEFAULT_MAX_BODY_BYTES, create_app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise FlashinferError(f"cannot listen on {host}:{port} ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise FlashinferError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    return sock


def make_server(engine: Engine, model_name: str, max_queue: int, log_level: str = "info",
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> uvicorn.Server:
    app = create_app(engine, model_name, max_queue, max_body_bytes)
    # timeout_graceful_shutdown: on Ctrl-C an open stream is cut after this, not waited for
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


def serve(engine: Engine, model_name: str, sock: socket.socket, max_queue: int,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down gracefully and return. The caller closes
    the engine and the socket."""
    _log_like_uvicorn(logging.getLogger("flashinfer.server"))
    try:
        make_server(engine, model_name, max_queue, max_body_bytes=max_body_bytes).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it already shut down for
        pass


def _log_like_uvicorn(logger: logging.Logger) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

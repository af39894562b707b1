"""Serving an app with uvicorn, on a socket bound before the model loads (a port in use is a start-up
error, and port 0 picks a free one that the start-up line names).

SIGTERM (and Ctrl-C): uvicorn stops accepting connections, lets in-flight responses finish until
`shutdown_timeout_s`, cancels what is left (which cancels those requests in the engines), and `serve`
shuts the model (a TTS, or a VoiceChat with its TTS) down, whether the server started or not. uvicorn then raises the signal again so that the process dies
of it (exit status 143); a server that has drained and shut down cleanly exits 0 instead: the
re-raised SIGTERM lands on a handler that does nothing.
"""
from __future__ import annotations

import logging
import signal
import socket

import uvicorn

from stepvox.engine.errors import ConfigError

from .app import create_app
from .config import ServerConfig


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on (host, port); ConfigError naming the address when it cannot."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address this machine can listen on ({exc})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def serve(model, config: ServerConfig, sock: socket.socket, shutdown_timeout_s: float = 30.0,
          log_level: str = "info", access_log: bool = True) -> None:
    """Serve `model` (a loaded TTS or VoiceChat) on `sock` (see bind_socket) until SIGTERM or SIGINT;
    the model is shut down on the way out."""
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        app = create_app(model, config, shutdown_model=False)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                                               timeout_graceful_shutdown=shutdown_timeout_s))
        server.run(sockets=[sock])
    finally:
        sock.close()
        try:
            model.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ConfigError("the server did not start (see the log above)")


def _drained(signum, frame) -> None:
    logging.getLogger("stepvox.server").info("stopped on SIGTERM")

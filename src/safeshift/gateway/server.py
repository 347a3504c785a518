"""``safeshift serve``: the gateway on uvicorn, with JSON logs and a graceful shutdown.

On SIGINT/SIGTERM uvicorn stops accepting connections and lets requests in flight finish;
then the app's lifespan stops the controller, finishes queued shadow copies (bounded by
``SAFESHIFT_DRAIN_TIMEOUT``), flushes telemetry and request records, and closes the models
and the store. Per-process settings come from ``SAFESHIFT_*`` variables
(:class:`~safeshift.gateway.settings.GatewaySettings`).
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from safeshift.errors import SafeshiftError
from safeshift.gateway.app import create_app
from safeshift.gateway.logs import configure_logging, gateway_logger
from safeshift.gateway.settings import GatewaySettings


def check_listen(host: str, port: int) -> None:
    """Refuse early, with the fix, an address the gateway could not listen on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SafeshiftError(f"cannot listen on {host}:{port}: {exc.strerror}; give --host an "
                             "address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            hint = ("another process is listening there: stop it or pick another --port"
                    if exc.errno == errno.EADDRINUSE else "give --host an address of this "
                    "machine and --port one you may use (ports below 1024 need privileges)")
            raise SafeshiftError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}"
                                 ) from None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is on this machine only."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def serve(plans: list[Path], *, store: str | None, host: str, port: int, controller: bool,
          tick_interval: float, auth: bool = True) -> None:
    """Serve ``plans`` on ``host:port`` until interrupted; without ``auth`` (and
    ``SAFESHIFT_AUTH=0`` alike) only on a loopback address."""
    configure_logging()
    settings = GatewaySettings.from_env()
    if not auth:
        settings = settings.with_overrides({"auth": False})
    if not settings.auth and not is_loopback(host):
        raise SafeshiftError(f"refusing to serve {host} without authentication: anyone who can "
                             "reach it could steer rollouts; serve on 127.0.0.1, or create "
                             "tokens (safeshift token create) and drop --no-auth")
    check_listen(host, port)  # before the rollouts are registered in the store
    app = create_app(plans, store=store, controller=controller, tick_interval=tick_interval,
                     settings=settings)
    if settings.auth and not app.gateway.store.list_tokens():
        gateway_logger.warning(
            "no tokens in the store: every request but health probes and /metrics gets 401; "
            "create one with safeshift token create --role admin --name you --store ...")
    elif not settings.auth:
        gateway_logger.warning("authentication is off (--no-auth): every request acts as "
                               "admin; for local demos only")
    # Everything loaded so far (frameworks, models) lives as long as the process: move it out
    # of the collector's sight, so that full collections stop traversing it (they paused the
    # event loop for ~90 ms every few seconds under load).
    gc.collect()
    gc.freeze()
    # Background threads (telemetry flushes, controller ticks) run Python for milliseconds at a
    # time; hand the GIL back to the event loop after 1 ms instead of 5 so that requests
    # arriving meanwhile wait less (it costs nothing while the loop runs alone).
    sys.setswitchinterval(0.001)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(settings.drain_timeout) + 5, server_header=False)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SafeshiftError(f"the gateway did not start on {host}:{port}; the log above "
                             "says why")
    gateway_logger.info("bye")

"""The data plane: predictions while rollouts run, feedback and reports, the Open Inference
Protocol, metrics. Build the ASGI app with :func:`create_app`; run it with
:func:`safeshift.gateway.server.serve` (``safeshift serve``)."""

from safeshift.gateway.app import GatewayApp, create_app
from safeshift.gateway.settings import GatewaySettings

__all__ = ["GatewayApp", "GatewaySettings", "create_app"]

"""The per-host ingress proxy (HAProxy) that makes a switch between releases drop no request.

``config`` is the pure part (unit, config file, runtime commands and their answers, private ports);
``proxy`` runs it over a host's SSH connection.
"""

from deployerd.ingress.config import PRIVATE_PORTS, UPSTREAM_HEADER, ProxyState, Route, allocate_port
from deployerd.ingress.proxy import IngressError, IngressProxy, Switched

__all__ = ["PRIVATE_PORTS", "UPSTREAM_HEADER", "IngressError", "IngressProxy", "ProxyState", "Route", "Switched",
           "allocate_port"]

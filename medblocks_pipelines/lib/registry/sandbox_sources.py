"""Sources that point at the embedded sandbox, and whether that sandbox is still running.

``medblocks-sandbox demo`` registers its sources with ``config["sandbox"] = true``: they live on loopback
ports that exist only while the demo runs. After the demo, ``make ui`` starts the daemon's
sensors and schedules over the same registry; without this check they would launch pulls against
ports nobody listens on (every pull failing, burying the demo's runs). A flagged source whose
loopback endpoint refuses a TCP connection is a *stopped sandbox*: sensors skip it and say so.
Sources without the flag, or on any non-loopback host, are never skipped (production is untouched).
"""

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from medblocks_pipelines.lib.registry.rows import Source

SANDBOX_FLAG = "sandbox"


def is_sandbox(source: Source) -> bool:
    """Whether the source was registered by the demo (``config["sandbox"]`` is true)."""
    return source.config.get(SANDBOX_FLAG) is True


def source_urls(source: Source) -> list[str]:
    """The URLs we call for ``source``: its FHIR base, or its network gateways' endpoints."""
    urls = [source.fhir_base_url] if source.fhir_base_url else []
    for gw in source.config.get("gateways") or []:
        urls += [gw[k] for k in ("xcpd_url", "xca_query_url", "xca_retrieve_url") if gw.get(k)]
    return urls


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts a TCP connection on ``host:port`` (loopback: answers at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def is_stopped_sandbox(source: Source, *, probe: Callable[[str, int], bool] = port_open) -> bool:
    """A demo-registered source whose loopback endpoints no longer accept connections."""
    if not is_sandbox(source):
        return False
    endpoints = set()
    for url in source_urls(source):
        parts = urlsplit(url)
        if not parts.hostname or not _is_loopback(parts.hostname):
            return False  # a sandbox flag on a real host: not ours to judge
        endpoints.add((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    return bool(endpoints) and not any(probe(host, port) for host, port in sorted(endpoints))

"""One ASGI app for every HTTP surface we serve: CDS Hooks, SMART launch/callback, connect links, JWKS.

Each surface lives in its own module exposing ``routes(ctx) -> list[BaseRoute]``; this module mounts them.

Every URL we hand out is built from one public base URL (``MEDBLOCKS_PUBLIC_BASE_URL``, e.g.
``https://host/medblocks`` behind a TLS-terminating proxy), never from the request: the CDS
``aud`` check must not trust a ``Host`` or ``X-Forwarded-*`` header a caller chose. With a path
prefix, the app answers both a proxy that passes the prefix through (``/medblocks/cds-services``)
and one that strips it (``/cds-services``); cookies are scoped to the public path.
"""

import contextlib
import importlib
import logging
import threading
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from medblocks_pipelines.lib.settings import (
    Settings,
    get_settings,
    normalize_public_base_url,
    public_path_prefix,
)

log = logging.getLogger(__name__)

# Surfaces contributed by the patterns: module path of a ``routes(ctx)`` function.
SURFACES = (
    "medblocks_pipelines.web.jwks",
    "medblocks_pipelines.web.connect",
    "medblocks_pipelines.web.ehr_launch",
    "medblocks_pipelines.web.cds",
)


@dataclass
class WebContext:
    """What every surface gets: settings, our public base URL, lazily opened control plane."""

    settings: Settings
    public_base_url: str
    extra: dict[str, Any] = field(default_factory=dict)
    _cp: Any = None
    #: Guards lazy construction: the first requests of a worker arrive together in threads, and
    #: on a brand-new SQLite file the first open creates the schema (alembic is not thread-safe).
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def public_path(self) -> str:
        """The public base URL's path prefix (``""`` or ``/prefix``): cookie paths start here."""
        return public_path_prefix(self.public_base_url)

    @property
    def secure(self) -> bool:
        """Peers reach us over HTTPS (cookies get ``Secure``; EHR-launch ones ``SameSite=None``)."""
        return self.public_base_url.startswith("https://")

    @property
    def control_plane(self) -> Any:
        if self._cp is None:
            with self.lock:
                if self._cp is None:
                    from medblocks_pipelines.lib.registry import open_control_plane

                    self._cp = open_control_plane(self.settings)
        return self._cp


async def health(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


class PublicPrefix:
    """ASGI middleware for a public base URL with a path prefix, and a proxy-mismatch warning.

    A request whose path starts with the prefix is routed below it (``root_path`` = prefix), so a
    proxy may pass the prefix through or strip it. ``X-Forwarded-Host``/``-Proto`` are never used
    to build URLs; when they disagree with the public base URL (a proxy in front, but
    ``MEDBLOCKS_PUBLIC_BASE_URL`` unset or wrong) one warning says so.
    """

    def __init__(self, app: ASGIApp, *, public_base_url: str) -> None:
        self.app = app
        self.prefix = public_path_prefix(public_base_url)
        parts = urllib.parse.urlsplit(public_base_url)
        self.scheme, self.netloc = parts.scheme, parts.netloc
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self._warned:
                self._check_forwarded(scope)
            path: str = scope["path"]
            # A root_path set by the server (uvicorn --root-path) already does this.
            passed_through = path == self.prefix or path.startswith(self.prefix + "/")
            if self.prefix and passed_through and not scope.get("root_path"):
                scope = {**scope, "root_path": self.prefix}
        await self.app(scope, receive, send)

    def _check_forwarded(self, scope: Scope) -> None:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"x-forwarded-host", b"").decode("latin-1").split(",")[0].strip()
        proto = headers.get(b"x-forwarded-proto", b"").decode("latin-1").split(",")[0].strip()
        if (host and host.lower() != self.netloc) or (proto and proto.lower() != self.scheme):
            self._warned = True
            # Names only the mismatch, not the request: peers will be refused (wrong CDS aud,
            # redirect URIs that do not match) until the public base URL is set right.
            log.warning(
                "requests arrive through a proxy as %s://%s but the public base URL is %s://%s;"
                " set MEDBLOCKS_PUBLIC_BASE_URL",
                proto or "?",
                host or "?",
                self.scheme,
                self.netloc,
            )


def create_app(
    *, public_base_url: str, settings: Settings | None = None, **extra: Any
) -> Starlette:
    """Build the app; ``public_base_url`` is how peers reach us (redirect URIs, JWKS URL, CDS aud,
    card links, cookie paths)."""
    public = normalize_public_base_url(public_base_url)
    ctx = WebContext(settings=settings or get_settings(), public_base_url=public, extra=extra)
    routes: list[BaseRoute] = [Route("/healthz", health)]
    for name in SURFACES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        routes.extend(module.routes(ctx))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(_warm_cds, ctx)
        yield
        # Shutdown: queued CDS audit rows are written before the process goes.
        service = ctx.extra.get("cds_service")
        if service is not None and hasattr(service, "close"):
            service.close()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(PublicPrefix, public_base_url=public)],
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    return app


def _warm_cds(ctx: WebContext) -> None:
    """Startup (``medblocks serve``): load the CDS warehouse indexes before accepting calls."""
    try:
        cds = importlib.import_module("medblocks_pipelines.web.cds")
        tenants = cds.get_service(ctx).warm()
    except Exception as exc:  # noqa: BLE001 - the other surfaces serve; CDS loads on first call
        log.warning("cds warm-up failed (%s); indexes load on first call", type(exc).__name__)
        return
    log.info("cds warm-up: %d tenant index(es) loaded", len(tenants))


def app_from_env() -> Starlette:
    """The app for ``medblocks serve --workers N`` (an import-string factory: each uvicorn worker
    process builds its own, with its own warehouse index and connections)."""
    public = Settings.from_env().public_base_url
    if not public:
        raise RuntimeError("MEDBLOCKS_PUBLIC_BASE_URL must be set for app_from_env")
    return create_app(public_base_url=public)

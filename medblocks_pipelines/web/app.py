"""One ASGI app for every HTTP surface we serve: CDS Hooks, SMART launch/callback, connect links, JWKS.

Each surface lives in its own module exposing ``routes(ctx) -> list[BaseRoute]``; this module mounts them.
"""

import importlib
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from medblocks_pipelines.lib.settings import Settings, get_settings

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

    @property
    def control_plane(self) -> Any:
        if self._cp is None:
            from medblocks_pipelines.lib.registry import open_control_plane

            self._cp = open_control_plane(self.settings)
        return self._cp


async def health(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app(
    *, public_base_url: str, settings: Settings | None = None, **extra: Any
) -> Starlette:
    """Build the app; ``public_base_url`` is how peers reach us (redirect URIs, JWKS URL, CDS aud)."""
    ctx = WebContext(
        settings=settings or get_settings(),
        public_base_url=public_base_url.rstrip("/"),
        extra=extra,
    )
    routes: list[BaseRoute] = [Route("/healthz", health)]
    for name in SURFACES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        routes.extend(module.routes(ctx))
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return app

"""Our public JWKS at a stable URL: ``GET /.well-known/jwks.json`` (SPECS §2).

Servers that register us by JWKS URL (Epic requires it) fetch this without authentication and may
cache it no longer than our ``Cache-Control`` says, so a new key is published before it signs
(see :mod:`medblocks_pipelines.lib.smart.keys`).
"""

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from medblocks_pipelines.lib.smart.keys import JWKS_MAX_AGE, KeyStore

JWKS_PATH = "/.well-known/jwks.json"


def jwks_url(public_base_url: str) -> str:
    """The JWKS URL to register with servers (and to send as ``jku``)."""
    return public_base_url.rstrip("/") + JWKS_PATH


def routes(ctx: Any) -> list[BaseRoute]:
    """The JWKS route; ``ctx`` is the web app's ``WebContext`` (control plane opened lazily)."""

    async def jwks(_request: Request) -> Response:
        body = KeyStore(ctx.control_plane.vault).jwks()
        return JSONResponse(
            body,
            media_type="application/jwk-set+json",
            headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"},
        )

    return [Route(JWKS_PATH, jwks, methods=["GET"], name="jwks")]

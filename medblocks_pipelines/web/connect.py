"""Patient-access connect surface: connect links, the launch start redirect and the SMART callback.

Routes (mounted by ``web/app.py``)::

    POST /connect/links            JSON, ``Authorization: Bearer <tenant connect key>``:
                                   {"tenant", "patient_ref", "source", "return_url"?} -> 201
                                   {"connection_id", "url", "expires_at"}
    GET  /connect/start/{token}    the link the patient opens: discovery, PKCE, state -> 302 to the
                                   source's authorize endpoint (an auto-submitting form for POST)
    GET  /connect/callback         the redirect_uri we register at sources: state check, code
                                   exchange -> 302 to the tenant's return URL (or a small page)
    DELETE /connect/connections/{id}  tenant key: revoke (tokens revoked at the source, data
                                   deleted per the tenant's delete_on_revoke, warehouse rebuilt)

Errors are short pages or JSON without tokens, codes or patient data. ``ctx.extra["http"]`` may
hold an ``httpx.Client`` (tests inject transports that way).
"""

import hashlib
import hmac
import html
import json
import secrets
import urllib.parse
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from medblocks_pipelines.lib.errors import ConfigError, LaunchError, MedblocksError, NotFound
from medblocks_pipelines.lib.fhir.pull import revoke_connection
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry.rows import Tenant
from medblocks_pipelines.lib.smart.launch import (
    begin_authorization,
    complete_authorization,
    create_connect_link,
    resolve_link,
)
from medblocks_pipelines.lib.warehouse.build import build_warehouse, warehouse_path

CALLBACK_PATH = "/connect/callback"
#: The browser-session cookie that ties a launch's state to the browser that started it.
SESSION_COOKIE = "mb_connect_session"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def api_key_secret_name(tenant_id: str) -> str:
    """Vault name of the SHA-256 of a tenant's connect API key."""
    return f"tenant/{tenant_id}/connect_api_key_sha256"


def issue_connect_api_key(cp: ControlPlane, tenant_id: str) -> str:
    """Create (or replace) a tenant's connect API key; returns it once, stores only its hash."""
    cp.get_tenant(tenant_id)
    key = "mbk_" + secrets.token_urlsafe(32)
    cp.vault.put(
        api_key_secret_name(tenant_id),
        hashlib.sha256(key.encode()).hexdigest(),
        tenant_id=tenant_id,
    )
    return key


def check_api_key(cp: ControlPlane, tenant_id: str, presented: str) -> bool:
    """Whether ``presented`` is the tenant's connect API key (constant-time compare)."""
    stored = cp.vault.get(api_key_secret_name(tenant_id))
    if stored is None or not presented:
        return False
    digest = hashlib.sha256(presented.encode()).hexdigest()
    return hmac.compare_digest(digest, stored.reveal())


def return_url_allowed(tenant: Tenant, url: str) -> bool:
    """An absolute http(s) URL, under one of the tenant's ``return_url_prefixes`` when it has any."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
        return False
    prefixes = (tenant.settings or {}).get("return_url_prefixes") or []
    return not prefixes or any(url.startswith(p) for p in prefixes)


def _page(title: str, message: str, status: int = 200) -> HTMLResponse:
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers=_NO_STORE)


def _autopost(endpoint: str, form: dict[str, str]) -> HTMLResponse:
    fields = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in form.items()
    )
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Redirecting'
        '</title></head><body onload="document.forms[0].submit()">'
        f'<form method="post" action="{html.escape(endpoint)}">{fields}'
        '<noscript><button type="submit">Continue</button></noscript></form></body></html>'
    )
    return HTMLResponse(body, headers=_NO_STORE)


def routes(ctx: Any) -> list[BaseRoute]:
    """The connect routes bound to ``ctx`` (a ``web.app.WebContext``)."""
    redirect_uri = f"{ctx.public_base_url}{CALLBACK_PATH}"

    def http() -> httpx.Client:
        client = ctx.extra.get("http")
        if client is None:
            client = ctx.extra["http"] = httpx.Client(timeout=20.0)
        return client

    def create_link(raw: bytes, header: str) -> Response:
        cp: ControlPlane = ctx.control_plane
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(
                {"error": "invalid_request", "detail": "body must be a JSON object"},
                status_code=400,
            )
        tenant_id, source_id = body.get("tenant"), body.get("source")
        patient_ref, return_url = body.get("patient_ref"), body.get("return_url")
        if not all(isinstance(v, str) and v for v in (tenant_id, source_id, patient_ref)):
            return JSONResponse(
                {
                    "error": "invalid_request",
                    "detail": "tenant, source and patient_ref are required",
                },
                status_code=400,
            )
        presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
        try:
            tenant = cp.get_tenant(str(tenant_id))
        except NotFound:
            tenant = None
        if tenant is None or not check_api_key(cp, str(tenant_id), presented):
            return JSONResponse(
                {"error": "unauthorized"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="connect"'},
            )
        if return_url is not None and (
            not isinstance(return_url, str) or not return_url_allowed(tenant, return_url)
        ):
            return JSONResponse(
                {"error": "invalid_request", "detail": "return_url is not allowed for this tenant"},
                status_code=400,
            )
        try:
            link = create_connect_link(
                cp,
                tenant_id=str(tenant_id),
                source_id=str(source_id),
                patient_ref=str(patient_ref),
                public_base_url=ctx.public_base_url,
                return_url=return_url,
            )
        except NotFound:
            return JSONResponse(
                {"error": "invalid_request", "detail": "unknown source"}, status_code=400
            )
        except LaunchError as exc:
            return JSONResponse({"error": exc.reason}, status_code=400)
        return JSONResponse(
            {
                "connection_id": link.connection_id,
                "url": link.url,
                "expires_at": link.expires_at.isoformat(),
            },
            status_code=201,
            headers=_NO_STORE,
        )

    async def create_link_async(request: Request) -> Response:
        # Read the body on the event loop, then do the blocking registry work in the threadpool.
        raw = await request.body()
        if "json" not in request.headers.get("content-type", ""):
            return JSONResponse(
                {"error": "invalid_request", "detail": "JSON body required"}, status_code=415
            )
        return await run_in_threadpool(create_link, raw, request.headers.get("authorization", ""))

    def start(request: Request) -> Response:
        cp: ControlPlane = ctx.control_plane
        binding = secrets.token_urlsafe(32)
        try:
            conn_id = resolve_link(cp, request.path_params["token"])
            req = begin_authorization(
                cp, conn_id, redirect_uri=redirect_uri, http=http(), session_binding=binding
            )
        except LaunchError as exc:
            return _page("Cannot connect", f"This link cannot be used ({exc.reason}).", 400)
        except ConfigError:
            return _page(
                "Cannot connect", "This app is not set up for this record system yet.", 500
            )
        except MedblocksError as exc:
            return _page(
                "Cannot connect",
                f"The record system is not reachable now ({type(exc).__name__}); try again later.",
                502,
            )
        resp: Response = (
            _autopost(req.endpoint, req.form)
            if req.method == "POST"
            else RedirectResponse(req.url, status_code=302, headers=_NO_STORE)
        )
        # SameSite=Lax: sent on the top-level redirect back from the authorization server.
        resp.set_cookie(
            SESSION_COOKIE,
            binding,
            max_age=15 * 60,
            path=f"{ctx.public_path}/connect",
            httponly=True,
            samesite="lax",
            secure=ctx.secure,
        )
        return resp

    def callback(request: Request) -> Response:
        cp: ControlPlane = ctx.control_plane
        params = dict(request.query_params)
        try:
            outcome = complete_authorization(
                cp, params=params, http=http(), session_binding=request.cookies.get(SESSION_COOKIE)
            )
        except LaunchError as exc:
            # No pending connection matches: nothing to blame, nothing to redirect to.
            return _page(
                "Connection refused", f"This sign-in response is not valid ({exc.reason}).", 400
            )
        if outcome.redirect_url:
            return RedirectResponse(outcome.redirect_url, status_code=302, headers=_NO_STORE)
        if outcome.ok:
            return _page("Connected", "Your records are connected. You can close this window.")
        return _page("Not connected", f"The connection was not made ({outcome.reason}).", 400)

    def revoke(connection_id: str, header: str) -> Response:
        cp: ControlPlane = ctx.control_plane
        try:
            conn = cp.get_connection(connection_id)
        except NotFound:
            conn = None
        presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
        # Same answer for "no such connection" and "not yours": ids are not an oracle.
        if (
            conn is None
            or conn.pattern != "patient_access"
            or not check_api_key(cp, conn.tenant_id, presented)
        ):
            return JSONResponse(
                {"error": "unauthorized"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="connect"'},
            )
        result = revoke_connection(
            cp,
            connection_id,
            lake_root=ctx.settings.lake,
            http=http(),
            reason="revoked by the tenant's app",
        )
        rebuilt = False
        if result.rows_deleted and warehouse_path(ctx.settings, conn.tenant_id).exists():
            build_warehouse(conn.tenant_id, settings=ctx.settings, control_plane=cp)
            rebuilt = True
        return JSONResponse(
            {
                "connection_id": connection_id,
                "state": "revoked",
                "revoked_at_source": result.revoked_at_source,
                "rows_deleted": result.rows_deleted,
                "warehouse_rebuilt": rebuilt,
            }
        )

    async def revoke_async(request: Request) -> Response:
        return await run_in_threadpool(
            revoke, request.path_params["connection_id"], request.headers.get("authorization", "")
        )

    return [
        Route("/connect/links", create_link_async, methods=["POST"]),
        Route("/connect/connections/{connection_id}", revoke_async, methods=["DELETE"]),
        Route("/connect/start/{token}", start, methods=["GET"]),
        Route(CALLBACK_PATH, callback, methods=["GET"]),
    ]

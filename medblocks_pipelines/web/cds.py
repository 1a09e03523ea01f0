"""CDS Hooks 2.0 over HTTP (SPECS §4): the routes of :class:`lib.cds.service.CdsService`.

Routes (mounted by ``web/app.py``)::

    GET  /cds-services                     discovery (JWT with aud = this exact URL)
    POST /cds-services/{id}                a hook call -> {"cards": [...]}
    POST /cds-services/{id}/feedback       card feedback

Refusals are JSON ``{"error": <reason>, "detail": <message>}`` with 400 (malformed), 401 (JWT),
404, 412 (needed data unobtainable), 415 or 503 (the jti replay store is down: fail closed);
never a token, key or patient datum.
``ctx.extra["http"]`` may hold an ``httpx.Client`` for JWKS and FHIR fetches;
``ctx.extra["cds_today"]`` a callable giving today's date (tests).
"""

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from medblocks_pipelines.lib.errors import CdsRequestError
from medblocks_pipelines.lib.warehouse.build import refresh_published, warehouse_path

log = logging.getLogger(__name__)


def _error(exc: CdsRequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="cds-services"'} if exc.status == 401 else None
    return JSONResponse(
        {"error": exc.reason, "detail": str(exc)}, status_code=exc.status, headers=headers
    )


def get_service(ctx: Any) -> Any:
    """The context's :class:`CdsService` (built on first use, shared by every request)."""
    service = ctx.extra.get("cds_service")
    if service is not None:
        return service
    with ctx.lock:
        return _build_service(ctx)


def _build_service(ctx: Any) -> Any:
    service = ctx.extra.get("cds_service")
    if service is None:
        from medblocks_pipelines.lib.cds.service import CdsService

        service = CdsService(
            ctx.control_plane,
            public_base_url=ctx.public_base_url,
            warehouse_path_of=lambda tenant: warehouse_path(ctx.settings, tenant),
            # Warehouses published to object storage: keep this server's copy current.
            warehouse_refresh_of=(
                (lambda tenant: refresh_published(ctx.settings, tenant))
                if ctx.settings.warehouse_url
                else None
            ),
            http=ctx.extra.get("http"),
            today=ctx.extra.get("cds_today"),
        )
        ctx.extra["cds_service"] = service
    return service


def routes(ctx: Any) -> list[BaseRoute]:
    """The CDS Hooks routes bound to ``ctx`` (a ``web.app.WebContext``)."""

    async def discovery(request: Request) -> Response:
        try:
            service = ctx.extra.get("cds_service") or await run_in_threadpool(get_service, ctx)
            body = await service.discovery_async(
                request.headers.get("authorization"), offload=run_in_threadpool
            )
        except CdsRequestError as exc:
            log.info("cds discovery refused: %s", exc.reason)
            return _error(exc)
        return JSONResponse(body)

    def json_post(method: str, what: str) -> Any:
        """A POST handler awaiting ``service.<method>(service_id, authorization, body, offload=)``
        (on the event loop where nothing has to wait, else in a thread)."""

        async def handler(request: Request) -> Response:
            if "json" not in request.headers.get("content-type", ""):
                return JSONResponse(
                    {
                        "error": "unsupported_media_type",
                        "detail": "the body must be application/json",
                    },
                    status_code=415,
                )
            raw = await request.body()
            try:
                service = ctx.extra.get("cds_service") or await run_in_threadpool(get_service, ctx)
                body = await getattr(service, method)(
                    request.path_params["service_id"],
                    request.headers.get("authorization"),
                    raw,
                    offload=run_in_threadpool,
                )
            except CdsRequestError as exc:
                log.info("cds %s refused: %s", what, exc.reason)
                return _error(exc)
            return JSONResponse(body)

        return handler

    call = json_post("call_async", "call")
    feedback = json_post("feedback_async", "feedback")

    return [
        Route("/cds-services", discovery, methods=["GET"]),
        Route("/cds-services/{service_id}", call, methods=["POST"]),
        Route("/cds-services/{service_id}/feedback", feedback, methods=["POST"]),
    ]

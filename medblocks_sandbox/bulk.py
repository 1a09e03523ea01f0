"""The sandbox's FHIR Bulk Data Access 2.0 ``$export`` server (SPECS.md 3).

What it serves, as routes an EHR app mounts (``BulkServer.routes()``) or as a standalone app
(:func:`create_bulk_app`):

* kick-off at system (``/$export``), all-patients (``/Patient/$export``) and Group
  (``/Group/{id}/$export``) level, by GET or by POST of a ``Parameters`` body; ``Accept:
  application/fhir+json`` and ``Prefer: respond-async`` are required (400 otherwise) and
  ``Prefer: handling=lenient`` turns unsupported parameters into ``error`` file entries;
* ``_outputFormat``, ``_since``, ``_type``, ``_typeFilter`` (evaluated by the FHIR store's search
  engine), ``_elements`` (root elements, ``SUBSETTED`` tag) and ``patient`` (POST only);
* status polling: ``202`` with ``X-Progress`` and ``Retry-After`` while the job "works" (a
  configurable duration), ``200`` with the manifest, 4xx/5xx OperationOutcome when it failed,
  ``DELETE`` to cancel or clean up (``202``, then ``404``);
* file download with ``Accept: application/fhir+ndjson``, gzip when the client accepts it, and
  byte ranges (``206``) so a client can resume; a token of the exporting client is required;
* vendor profiles (``profiles.py``) and faults (``faults.py``).

Exports run in a worker thread that streams resources from a :class:`BulkSource` into NDJSON
files under a work directory; nothing is held in memory beyond one resource. A
:class:`NdjsonDirSource` serves pre-generated NDJSON files, unchanged, for an unfiltered system
export (the large-benchmark path).

Wiring (what ``run.py`` does)::

    server = BulkServer(store, authenticator=require_token, profile="oracle", faults=injector)
    app = create_ehr_app(..., extra_routes=server.routes(),      # before /{type}/{id}
                         root_routes=[*fault_admin_routes(injector), *bulk_admin_routes(server)],
                         middleware=[Middleware(FaultMiddleware, faults=injector, ...)])
    # presigned_redirects profiles only: a file host on another port
    storage = ServerThread(bind_socket(), presigned_storage_app([server])).start()
    server.storage_base_url = storage.url

STU3 ``organizeOutputBy=Patient``, ``includeAssociatedData`` (Provenance) and
``allowPartialManifests`` (paged manifests with the ``paged_manifest`` fault) live in
``bulk_stu3.py``; the vendor quirks ``retry_after_epoch``, ``export_expires`` and
``manifest_errors_partial`` are faults (``faults.py``).

Not implemented: the other STU3/4 additions (``_until``, ``Prefer: separate-export-status``, the
``outcome`` rename), Binary and attachments in patient-level exports, ``_elements`` beyond root elements (mandatory
elements are not added back), HAPI-style job reuse, and persistence across restarts (jobs live
in memory; files in the work directory).
"""

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from medblocks_sandbox.bulk_auth import StaticTokens
from medblocks_sandbox.bulk_files import FileEndpoints, _s3_error
from medblocks_sandbox.bulk_jobs import BulkConfig
from medblocks_sandbox.bulk_kickoff import KickoffEndpoints
from medblocks_sandbox.faults import FaultMiddleware, fault_admin_routes, jwt_client_resolver


class BulkServer(KickoffEndpoints, FileEndpoints):
    """The ``$export`` endpoints over a :class:`BulkSource`, with a profile and faults.

    ``authenticator`` validates the bearer token of every bulk call and returns
    :class:`TokenInfo` (the EHR passes its token validator; tests can pass ``StaticTokens``).
    ``storage_base_url`` is the origin of the presigned-file app (:meth:`storage_app`), needed
    by profiles with ``presigned_redirects``; set it once that server is listening.
    """

    # -- wiring -------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        """Routes to mount at the FHIR base, before any ``/{type}/{id}`` route of the EHR."""
        return [
            Route("/$export", self._kickoff_system, methods=["GET", "POST"], name="bulk_export"),
            Route(
                "/Patient/$export",
                self._kickoff_patient,
                methods=["GET", "POST"],
                name="bulk_export_patient",
            ),
            Route(
                "/Group/{group_id}/$export",
                self._kickoff_group,
                methods=["GET", "POST"],
                name="bulk_export_group",
            ),
            Route(
                "/bulk-status/{job_id}", self._status, methods=["GET", "DELETE"], name="bulk_status"
            ),
            Route("/bulk-files/{job_id}/{name}", self._download, methods=["GET"], name="bulk_file"),
        ]

    def storage_app(self) -> Starlette:
        """The presigned-URL file host (another origin) used by ``presigned_redirects``."""
        return presigned_storage_app([self])


def presigned_storage_app(servers: list[BulkServer]) -> Starlette:
    """One presigned-file host for several bulk servers (e.g. every Oracle-like org).

    Serve it on its own port (another origin) and set each server's ``storage_base_url`` to its
    URL. The list is read per request, so servers can be appended after the app is built.
    """

    async def presigned(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        owner = next((s for s in servers if s.has_job(job_id)), None)
        if owner is None and servers:
            owner = servers[0]  # it still answers 400/403/404 in the right order
        if owner is None:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return await owner._presigned(request)

    return Starlette(
        routes=[
            Route("/presigned/{job_id}/{name}", presigned, methods=["GET"], name="presigned_file"),
        ]
    )


def bulk_admin_routes(
    server: BulkServer, *, prefix: str = "/_sandbox/bulk", admin_token: str | None = None
) -> list[BaseRoute]:
    """Admin API of a bulk server: ``GET`` shows its profile, config and jobs; ``PATCH`` (or
    ``POST``) with a JSON object changes :class:`BulkConfig` fields (e.g. ``export_seconds``).
    With ``admin_token`` set, calls need the ``X-Sandbox-Admin`` header to match it.
    """
    fields = {f.name: f.type for f in dataclasses.fields(BulkConfig)}

    async def handler(request: Request) -> Response:
        if admin_token is not None and request.headers.get("x-sandbox-admin") != admin_token:
            return JSONResponse({"error": "forbidden"}, status_code=403)
        if request.method in ("PATCH", "POST"):
            try:
                changes = json.loads(await request.body())
                if not isinstance(changes, dict):
                    raise ValueError("a JSON object of config fields")
                updates = {}
                for name, value in changes.items():
                    if name not in fields:
                        raise ValueError(f"unknown config field {name}")
                    updates[name] = _coerce(name, value, getattr(server.config, name))
            except (ValueError, TypeError) as exc:
                return JSONResponse(
                    {"error": "invalid_config", "detail": str(exc)}, status_code=400
                )
            for name, value in updates.items():
                setattr(server.config, name, value)
        return JSONResponse(
            {
                "profile": server.profile.name,
                "config": dataclasses.asdict(server.config),
                "jobs": [
                    {
                        "id": j.id,
                        "client_id": j.client_id,
                        "status": j.status,
                        "level": j.plan.level,
                        "files": len(j.files),
                        "resources": sum(f.count for f in j.files if f.kind == "output"),
                    }
                    for j in server.jobs()
                ],
            }
        )

    return [Route(prefix, handler, methods=["GET", "PATCH", "POST"], name="sandbox_bulk")]


def _coerce(name: str, value: Any, current: Any) -> Any:
    """Check an admin config value against the field's current type."""
    if value is None and name == "cancel_after_early_polls":
        return None
    if isinstance(current, bool) or name == "enforce_retry_after":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if name in ("export_seconds", "file_ttl"):
        return float(value)
    if int(value) != value:
        raise ValueError(f"{name} must be a whole number")
    return int(value)


def create_bulk_app(
    server: BulkServer,
    *,
    client_resolver: Callable[[str], str | None] | None = None,
    admin_token: str | None = None,
) -> Starlette:
    """A standalone bulk app: the bulk routes, the fault and bulk admin APIs (under
    ``/_sandbox``) and the fault middleware."""
    resolver = client_resolver
    if resolver is None:
        resolver = (
            server.authenticator.client_of
            if isinstance(server.authenticator, StaticTokens)
            else jwt_client_resolver
        )
    if isinstance(server.authenticator, StaticTokens) and server.faults.on_token_expired is None:
        server.faults.on_token_expired = server.authenticator.expire
    return Starlette(
        routes=[
            *fault_admin_routes(server.faults, admin_token=admin_token),
            *bulk_admin_routes(server, admin_token=admin_token),
            *server.routes(),
        ],
        middleware=[Middleware(FaultMiddleware, faults=server.faults, client_resolver=resolver)],
    )

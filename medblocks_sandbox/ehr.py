"""The sandbox EHR: FHIR R4 REST + SMART authorization server for one organization (one ASGI app).

Layout of one org app (mounted by `run.py` at `/{org_id}` of the EHR role's server)::

    /fhir/metadata                                CapabilityStatement (no token needed)
    /fhir/.well-known/smart-configuration         SMART discovery (application/json, any Accept)
    /fhir/{type}?...  /fhir/{type}/_search        search (Bundle searchset, total, paging)
    /fhir/{type}/{id}  /_history  /_history/{v}   read, instance history, vread
    /fhir/Patient/{id}/$everything                the patient's compartment and what it references
    POST /fhir  POST|PUT|DELETE /fhir/{type}[/{id}]  writes, EHR orgs only (`fhir_writes.py`)
    /auth/...                                     the authorization server (`auth.AuthServer`)
    /_admin/...                                   loopback + `X-Admin-Secret` only

Seams: `create_ehr_app(..., extra_routes=...)` puts routes (relative to the FHIR base, e.g. the Bulk
Data `$export` routes) before the generic `{type}/{id}` ones; `middleware=` wraps the whole app
(fault injection); `require_token` (in `auth`) validates tokens for any route inside the app.
"""

from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from medblocks_sandbox.auth import AuthServer
from medblocks_sandbox.auth_model import AuthConfig
from medblocks_sandbox.ehr_admin import _Admin
from medblocks_sandbox.ehr_api import _FhirApi
from medblocks_sandbox.ehr_common import (
    EHR_TYPES,
    US_CORE_SERVER,
    ChangeSet,
    OrgConfig,
    _display_name,
    _fhir_error_handler,
)
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import FaultInjector
from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.fhir_store import FhirStore
from medblocks_sandbox.fhir_writes import FhirWrites


def create_ehr_app(
    org: OrgConfig,
    store: FhirStore,
    *,
    base_url: str,
    admin_secret: str,
    auth_config: AuthConfig | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    middleware: Sequence[Middleware] = (),
    profile: Any = None,
    resource_types: Sequence[str] = EHR_TYPES,
    instantiates: Sequence[str] = (US_CORE_SERVER,),
    evolver: Callable[[int], ChangeSet] | None = None,
    root_routes: Sequence[BaseRoute] = (),
    faults: FaultInjector | None = None,
) -> Starlette:
    """Build the ASGI app of one organization's EHR (FHIR base `{base_url}/fhir`).

    `base_url` is the absolute URL the app is reachable at (its mount point): it makes the FHIR
    base the authorization server checks `aud` against. `profile` is a vendor profile
    (`sandbox.profiles.VendorProfile`); its `require_jwks_url` makes backend registration demand a
    JWKS URL. `evolver(step)` yields the changes `/_admin/apply-changes {"step": n}` applies.
    `root_routes` are added at the app root (e.g. the fault admin API at `/_sandbox/faults`).
    `faults` drives the search-level faults (`next_link_drops_params`, `foreign_entry_in_search`,
    `no_category_search`, see `sandbox.faults`). The app's `state` holds `store`, `auth_server`, `org`, `profile`, `fhir_base`.
    """
    base_url = base_url.rstrip("/")
    fhir_base = f"{base_url}/fhir"
    config = auth_config or AuthConfig()
    if getattr(profile, "require_jwks_url", False):
        config.require_jwks_url = True
    auth = AuthServer(
        org_id=org.org_id,
        org_name=org.name,
        fhir_base=fhir_base,
        auth_base=f"{base_url}/auth",
        logins=org.logins,
        config=config,
    )
    for patient in store.iter_type("Patient"):
        auth.patient_names[patient["id"]] = _display_name(patient)
    # Writes (fhir_writes.py) for EHR orgs; the payer's Patient Access API stays read-only.
    writable = org.kind == "ehr"
    fhir = _FhirApi(
        store,
        auth,
        fhir_base,
        tuple(resource_types),
        tuple(instantiates),
        writable=writable,
        faults=faults if faults is not None else FaultInjector(),
    )
    admin = _Admin(store, auth, admin_secret, evolver)
    write_routes: list[BaseRoute] = []
    app_write_routes: list[BaseRoute] = []
    if writable:

        def remember_patient(resource: Resource) -> None:
            if resource["resourceType"] == "Patient":
                auth.patient_names[resource["id"]] = _display_name(resource)

        writes = FhirWrites(
            store,
            fhir_base,
            resource_types,
            allowed=lambda grants, resource: fhir._allowed(grants, resource, by_content=True),
            forbid=fhir._forbid,
            on_stored=remember_patient,
        )
        write_routes = [
            Route("/", writes.bundle, methods=["POST"]),
            Route("/{type}", writes.create, methods=["POST"]),
            Route("/{type}/{id}", writes.update, methods=["PUT"]),
            Route("/{type}/{id}", writes.delete, methods=["DELETE"]),
        ]

        async def base_without_slash(request: Request) -> Response:
            # `POST [base]` as the spec writes it (the Mount alone would redirect to `[base]/`).
            if request.method == "POST":
                return await writes.bundle(request)
            return await fhir.not_found(request)

        app_write_routes = [
            Route("/fhir", base_without_slash, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        ]
    fhir_routes: list[BaseRoute] = [
        Route("/metadata", fhir.metadata, methods=["GET"]),
        Route("/.well-known/smart-configuration", fhir.smart_configuration, methods=["GET"]),
        *extra_routes,
        Route("/Patient/{id}/$everything", fhir.everything, methods=["GET"]),
        Route("/{type}/_search", fhir.search_post, methods=["POST"]),
        Route("/{type}/{id}/_history/{vid}", fhir.vread, methods=["GET"]),
        Route("/{type}/{id}/_history", fhir.history, methods=["GET"]),
        Route("/{type}/{id}", fhir.read, methods=["GET"]),
        Route("/{type}", fhir.search_get, methods=["GET"]),
        *write_routes,
        Route("/{rest:path}", fhir.not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    app = Starlette(
        routes=[
            *app_write_routes,
            Mount("/fhir", routes=fhir_routes),
            Mount("/auth", routes=auth.routes()),
            Mount("/_admin", routes=admin.routes()),
            *root_routes,
        ],
        middleware=list(middleware),
        exception_handlers={FhirHttpError: _fhir_error_handler},  # type: ignore[dict-item]
    )
    app.state.store = store
    app.state.auth_server = auth
    app.state.org = org
    app.state.profile = profile
    app.state.fhir_base = fhir_base
    return app

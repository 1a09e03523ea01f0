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

import base64
import email.utils
import hmac
import ipaddress
import json
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from medblocks_sandbox.auth import AuthServer, bearer_challenge, require_token
from medblocks_sandbox.auth_model import AuthConfig, Login, TokenInfo
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import FaultInjector
from medblocks_sandbox.fhir_match import (
    compile_filters,
    element_values,
    matches,
    parse_date_range,
    reference_key,
)
from medblocks_sandbox.fhir_params import SHARED_TYPES, Resource, params_for
from medblocks_sandbox.fhir_store import FhirStore, format_instant
from medblocks_sandbox.fhir_write_checks import accepts_json
from medblocks_sandbox.fhir_writes import FhirWrites
from medblocks_sandbox.smart_scopes import AccessGrant

FHIR_JSON = "application/fhir+json"
FHIR_VERSION = "4.0.1"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 10_000  # large on purpose: the huge_page fault asks for big pages
ADMIN_HEADER = "X-Admin-Secret"

EHR_TYPES: tuple[str, ...] = (
    "Patient",
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Binary",
    "Encounter",
    "Goal",
    "Immunization",
    "Location",
    "Medication",
    "MedicationRequest",
    "Observation",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Coverage",
    "ExplanationOfBenefit",
)
US_CORE_SERVER = "http://hl7.org/fhir/us/core/CapabilityStatement/us-core-server"

#: A change set applied by `/_admin/apply-changes`: resources to upsert and (type, id) to delete.
ChangeSet = tuple[list[Resource], list[tuple[str, str]]]


@dataclass(frozen=True)
class OrgConfig:
    """One sandbox organization served by an EHR or payer app."""

    org_id: str
    name: str
    kind: str = "ehr"
    logins: tuple[Login, ...] = field(default=(), repr=False)


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


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """A one-issue OperationOutcome."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def fhir_response(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A FHIR JSON response (`application/fhir+json; charset=utf-8`)."""
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=FHIR_JSON,
        headers=dict(headers or {}),
    )


async def _fhir_error_handler(request: Request, exc: FhirHttpError) -> Response:
    return fhir_response(operation_outcome(exc.code, str(exc)), exc.status, exc.headers)


def _display_name(patient: Resource) -> str:
    for name in patient.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*(name.get("given") or []), name.get("family") or ""]
        if any(parts):
            return " ".join(p for p in parts if p)
    return f"Patient/{patient.get('id')}"


def _check_accept(request: Request) -> None:
    if not accepts_json(request):
        raise FhirHttpError(406, "not-supported", "this server speaks JSON only")


# ---------------------------------------------------------------------------------------------
# FHIR REST
# ---------------------------------------------------------------------------------------------
_SORTABLE = {"_lastUpdated", "_id", "date", "authoredon", "birthdate", "service-date"}


class _FhirApi:
    def __init__(
        self,
        store: FhirStore,
        auth: AuthServer,
        fhir_base: str,
        types: tuple[str, ...],
        instantiates: tuple[str, ...],
        *,
        writable: bool = False,
        faults: FaultInjector | None = None,
    ) -> None:
        self.faults = faults if faults is not None else FaultInjector()
        self.store = store
        self.auth = auth
        self.base = fhir_base
        self.types = types
        self.instantiates = instantiates
        self.writable = writable

    # -- discovery -----------------------------------------------------------------------------
    async def smart_configuration(self, request: Request) -> Response:
        # Always application/json, whatever Accept says (SPECS §1.1).
        return JSONResponse(self.auth.smart_configuration())

    async def metadata(self, request: Request) -> Response:
        _check_accept(request)
        no_category = self.faults.peek("no_category_search", client_id=None, path=request.url.path)
        resources = []
        for rtype in self.types:
            entry: dict[str, Any] = {
                "type": rtype,
                "interaction": [{"code": c} for c in ("read", "vread", "history-instance")],
            }
            if self.writable:
                entry["interaction"] += [{"code": c} for c in ("create", "update", "delete")]
                entry.update(
                    versioning="versioned-update",
                    updateCreate=True,
                    conditionalCreate=False,
                    conditionalUpdate=False,
                    conditionalDelete="not-supported",
                )
            if rtype != "Binary":
                entry["interaction"].append({"code": "search-type"})
                entry["searchParam"] = [
                    {
                        "name": p.name,
                        "type": p.kind,
                        "documentation": "paths: " + ", ".join(p.paths),
                    }
                    for p in params_for(rtype).values()
                    if not (no_category and p.name == "category")
                ]
                entry["searchInclude"] = [
                    f"{rtype}:{p.name}" for p in params_for(rtype).values() if p.kind == "reference"
                ]
            if rtype == "Patient":
                entry["operation"] = [
                    {
                        "name": "everything",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    }
                ]
            resources.append(entry)
        smart = self.auth.smart_configuration()
        body: dict[str, Any] = {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": format_instant(self.store.now()),
            "kind": "instance",
            "instantiates": list(self.instantiates),
            "software": {"name": "medblocks sandbox EHR"},
            "implementation": {"description": self.auth.org_name, "url": self.base},
            "fhirVersion": FHIR_VERSION,
            "format": ["json", FHIR_JSON],
            "rest": [
                {
                    "mode": "server",
                    "security": {
                        "cors": False,
                        "service": [
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                        "code": "SMART-on-FHIR",
                                    }
                                ]
                            }
                        ],
                        # Deprecated for discovery (SPECS §1.1) but still read by older clients.
                        "extension": [
                            {
                                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                                "extension": [
                                    {
                                        "url": "authorize",
                                        "valueUri": smart["authorization_endpoint"],
                                    },
                                    {"url": "token", "valueUri": smart["token_endpoint"]},
                                    {
                                        "url": "introspect",
                                        "valueUri": smart["introspection_endpoint"],
                                    },
                                    {"url": "revoke", "valueUri": smart["revocation_endpoint"]},
                                ],
                            }
                        ],
                    },
                    "resource": resources,
                }
            ],
        }
        if self.writable:
            body["rest"][0]["interaction"] = [{"code": "transaction"}, {"code": "batch"}]
        return fhir_response(body)

    # -- helpers -------------------------------------------------------------------------------
    def _check_type(self, rtype: str) -> None:
        if rtype not in self.types:
            raise FhirHttpError(404, "not-supported", f"resource type {rtype!r} is not served here")

    def _forbid(self, token: TokenInfo, rtype: str, letter: str) -> FhirHttpError:
        scope = (
            f"patient/{rtype}.{letter}" if token.compartment_patient else f"system/{rtype}.{letter}"
        )
        return FhirHttpError(
            403,
            "forbidden",
            f"the token's scopes do not allow this on {rtype}",
            headers={
                "WWW-Authenticate": bearer_challenge(self.base, "insufficient_scope", scope=scope)
            },
        )

    def _allowed(
        self, grants: Sequence[AccessGrant], resource: Resource, *, by_content: bool = False
    ) -> bool:
        """Whether one of the grants lets the token see this resource.

        `by_content` decides the compartment from the resource itself rather than the live index
        (older versions and deleted resources).
        """
        rtype, rid = resource["resourceType"], resource["id"]
        members: frozenset[str] | None = self.store.patients_in(resource) if by_content else None
        for grant in grants:
            if grant.patient is not None and rtype not in SHARED_TYPES:
                if members is None:
                    members = self.store.compartment_of(rtype, rid)
                if grant.patient not in members:
                    continue
            if grant.filters and not matches(resource, compile_filters(rtype, grant.filters)):
                continue
            return True
        return False

    def _visible(self, token: TokenInfo, resource: Resource, letter: str = "r") -> bool:
        return self._allowed(token.grants_for(resource["resourceType"], letter), resource)

    # -- read ----------------------------------------------------------------------------------
    async def read(self, request: Request) -> Response:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        self._check_type(rtype)
        token = require_token(request)
        grants = token.grants_for(rtype, "r")
        if not grants:
            raise self._forbid(token, rtype, "r")
        state = self.store.state(rtype, rid)
        if state == "absent":
            raise FhirHttpError(404, "not-found", f"{rtype}/{rid} is not known")
        if state == "deleted":
            raise FhirHttpError(410, "deleted", f"{rtype}/{rid} was deleted")
        resource = self.store.get(rtype, rid)
        assert resource is not None
        if not self._allowed(grants, resource):
            raise FhirHttpError(403, "forbidden", f"{rtype}/{rid} is outside this token's access")
        if rtype == "Binary" and not _wants_fhir(request):
            # Binary read with a non-FHIR Accept returns the raw content (FHIR R4 Binary).
            data = base64.b64decode(resource.get("data") or "")
            return Response(
                data, media_type=resource.get("contentType") or "application/octet-stream"
            )
        _check_accept(request)
        meta = resource.get("meta", {})
        return fhir_response(
            resource,
            headers={
                "ETag": f'W/"{meta.get("versionId", "1")}"',
                "Last-Modified": _http_date(meta.get("lastUpdated")),
            },
        )

    async def vread(self, request: Request) -> Response:
        rtype, rid, vid = (request.path_params[k] for k in ("type", "id", "vid"))
        self._check_type(rtype)
        _check_accept(request)
        token = require_token(request)
        grants = token.grants_for(rtype, "r")
        if not grants:
            raise self._forbid(token, rtype, "r")
        version = self.store.vread(rtype, rid, vid)
        if version is None:
            raise FhirHttpError(404, "not-found", f"{rtype}/{rid} has no version {vid}")
        if version.resource is None:
            raise FhirHttpError(410, "deleted", f"{rtype}/{rid} version {vid} is a deletion")
        if not self._allowed(grants, version.resource, by_content=True):
            raise FhirHttpError(403, "forbidden", f"{rtype}/{rid} is outside this token's access")
        return fhir_response(version.resource, headers={"ETag": f'W/"{vid}"'})

    async def history(self, request: Request) -> Response:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        self._check_type(rtype)
        _check_accept(request)
        token = require_token(request)
        grants = token.grants_for(rtype, "r")
        if not grants:
            raise self._forbid(token, rtype, "r")
        versions = self.store.history(rtype, rid)
        if not versions:
            raise FhirHttpError(404, "not-found", f"{rtype}/{rid} is not known")
        latest = next((v.resource for v in reversed(versions) if v.resource), None)
        if latest is None or not self._allowed(grants, latest, by_content=True):
            raise FhirHttpError(403, "forbidden", f"{rtype}/{rid} is outside this token's access")
        entries = []
        for v in reversed(versions):
            url = f"{self.base}/{rtype}/{rid}"
            entry: dict[str, Any] = {"fullUrl": url}
            if v.resource is None:
                entry["request"] = {"method": "DELETE", "url": f"{rtype}/{rid}"}
                entry["response"] = {
                    "status": "410",
                    "lastModified": format_instant(v.last_updated),
                }
            else:
                entry["resource"] = v.resource
                entry["request"] = {
                    "method": "PUT" if v.version_id > 1 else "POST",
                    "url": f"{rtype}/{rid}",
                }
            entries.append(entry)
        return fhir_response(
            {"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries}
        )

    async def not_found(self, request: Request) -> Response:
        if request.method != "GET":
            raise FhirHttpError(405, "not-supported", f"{request.method} is not supported here")
        raise FhirHttpError(404, "not-found", "no such FHIR endpoint")

    # -- search --------------------------------------------------------------------------------
    async def search_get(self, request: Request) -> Response:
        return self._search(request, list(request.query_params.multi_items()))

    async def search_post(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise FhirHttpError(415, "not-supported", "_search needs a form-encoded body")
        form = await request.form()
        items = list(request.query_params.multi_items()) + [
            (k, str(v)) for k, v in form.multi_items()
        ]
        return self._search(request, items)

    def _search(self, request: Request, params: list[tuple[str, str]]) -> Response:
        rtype = request.path_params["type"]
        self._check_type(rtype)
        _check_accept(request)
        token = require_token(request)
        if rtype == "Binary":
            raise FhirHttpError(405, "not-supported", "Binary cannot be searched")
        grants = token.grants_for(rtype, "s")
        if not grants:
            raise self._forbid(token, rtype, "s")
        count, offset, summary_count = _paging(params)
        includes = _parse_includes(params, "_include", rtype)
        revincludes = _parse_includes(params, "_revinclude", None)
        sort = _parse_sort(params, rtype)
        where = {"client_id": token.client_id, "path": request.url.path}
        empty = self._no_category(params, where)
        # A broken server that answers a search without a patient parameter from every patient.
        leaky = self.faults.peek("next_link_drops_params", **where) is not None and not any(
            k.split(":")[0] in ("patient", "subject", "beneficiary", "_id") for k, _v in params
        )
        within = None
        patients = {g.patient for g in grants}
        if rtype not in SHARED_TYPES and None not in patients and len(patients) == 1 and not leaky:
            (only,) = patients
            assert only is not None
            self._check_patient_param(params, rtype, only)
            within = self.store.compartment_keys(only)
        results = [
            r
            for r in self.store.search(rtype, params, within=within)
            if (leaky or self._allowed(grants, r)) and not empty
        ]
        if within is not None and self.faults.take("foreign_entry_in_search", **where) is not None:
            foreign = next(
                (r for r in self.store.search(rtype, []) if (rtype, r["id"]) not in within), None
            )
            if foreign is not None:
                results.insert(min(offset, len(results)), foreign)
        if sort:
            results = _sorted(results, sort, rtype)
        return fhir_response(
            self._bundle(
                token,
                params,
                results,
                count,
                offset,
                summary_count,
                includes,
                revincludes,
                path=f"{self.base}/{rtype}",
                drop_params=self.faults.peek("next_link_drops_params", **where) is not None,
            )
        )

    def _no_category(self, params: list[tuple[str, str]], where: dict[str, Any]) -> bool:
        """Apply a ``no_category_search`` fault: True means "answer no matches"."""
        if not any(k.split(":")[0] == "category" for k, _v in params):
            return False
        rule = self.faults.peek("no_category_search", **where)
        if rule is None:
            return False
        if rule.params["mode"] == "400":
            raise FhirHttpError(400, "not-supported", "unknown search parameter 'category'")
        return True

    def _check_patient_param(self, params: list[tuple[str, str]], rtype: str, patient: str) -> None:
        # A patient-context token asking explicitly for another patient: refuse rather than
        # silently answering an empty page.
        names = {"patient", "subject", "beneficiary"} if rtype != "Patient" else {"_id"}
        for name, value in params:
            if name.split(":")[0] not in names:
                continue
            for v in value.split(","):
                key = reference_key(v) if "/" in v else ("Patient", v)
                if key and key[0] == "Patient" and key[1] != patient:
                    raise FhirHttpError(
                        403, "forbidden", "this token is limited to another patient's record"
                    )

    def _bundle(
        self,
        token: TokenInfo,
        params: list[tuple[str, str]],
        results: list[Resource],
        count: int,
        offset: int,
        summary_count: bool,
        includes: list[tuple[str, str, str | None]],
        revincludes: list[tuple[str, str, str | None]],
        *,
        path: str,
        drop_params: bool = False,
    ) -> dict[str, Any]:
        kept = [(k, v) for k, v in params if k not in ("_offset", "_count") and not drop_params]

        def link(off: int) -> str:
            query = urllib.parse.urlencode([*kept, ("_count", str(count)), ("_offset", str(off))])
            return f"{path}?{query}"

        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(results),
            "meta": {"lastUpdated": format_instant(self.store.now())},
            "link": [{"relation": "self", "url": link(offset)}],
        }
        if summary_count:
            bundle["link"] = [
                {"relation": "self", "url": f"{path}?{urllib.parse.urlencode(params)}"}
            ]
            return bundle
        page = results[offset : offset + count]
        if offset + count < len(results):
            bundle["link"].append({"relation": "next", "url": link(offset + count)})
        if offset > 0:
            bundle["link"].append({"relation": "previous", "url": link(max(0, offset - count))})
        entries = [self._entry(r, "match") for r in page]
        seen = {(r["resourceType"], r["id"]) for r in page}
        for extra in self._included(token, page, includes, revincludes):
            key = (extra["resourceType"], extra["id"])
            if key not in seen:
                seen.add(key)
                entries.append(self._entry(extra, "include"))
        bundle["entry"] = entries
        return bundle

    def _entry(self, resource: Resource, mode: str) -> dict[str, Any]:
        return {
            "fullUrl": f"{self.base}/{resource['resourceType']}/{resource['id']}",
            "resource": resource,
            "search": {"mode": mode},
        }

    def _included(
        self,
        token: TokenInfo,
        page: list[Resource],
        includes: list[tuple[str, str, str | None]],
        revincludes: list[tuple[str, str, str | None]],
    ) -> list[Resource]:
        out: list[Resource] = []
        for source_type, pname, target in includes:
            param = params_for(source_type)[pname]
            for resource in page:
                if resource["resourceType"] != source_type:
                    continue
                for path in param.paths:
                    for value in element_values(resource, path):
                        ref = value.get("reference") if isinstance(value, dict) else None
                        key = reference_key(ref) if isinstance(ref, str) else None
                        if not key or (target and key[0] != target):
                            continue
                        found = self.store.get(*key)
                        # Included resources obey the token's access too.
                        if found is not None and self._visible(token, found):
                            out.append(found)
        if revincludes:
            keys = {(r["resourceType"], r["id"]) for r in page}
            for source_type, pname, _target in revincludes:
                param = params_for(source_type)[pname]
                for candidate in self.store.iter_type(source_type):
                    refs = {
                        reference_key(v["reference"])
                        for path in param.paths
                        for v in element_values(candidate, path)
                        if isinstance(v, dict) and isinstance(v.get("reference"), str)
                    }
                    if refs & keys and self._visible(token, candidate):
                        out.append(candidate)
        return out

    # -- $everything ---------------------------------------------------------------------------
    async def everything(self, request: Request) -> Response:
        pid = request.path_params["id"]
        _check_accept(request)
        token = require_token(request)
        if not token.grants_for("Patient", "r"):
            raise self._forbid(token, "Patient", "r")
        params = list(request.query_params.multi_items())
        allowed = {"_since", "_type", "_count", "_offset", "_format"}
        for name, _ in params:
            if name not in allowed:
                raise FhirHttpError(400, "not-supported", f"$everything does not support {name!r}")
        patient = self.store.get("Patient", pid)
        if patient is None:
            state = self.store.state("Patient", pid)
            raise FhirHttpError(
                410 if state == "deleted" else 404,
                "deleted" if state == "deleted" else "not-found",
                f"Patient/{pid} is not available",
            )
        if not self._visible(token, patient):
            raise FhirHttpError(403, "forbidden", "this token is limited to another patient")
        count, offset, _ = _paging(params)
        types: set[str] | None = None
        since = None
        for name, value in params:
            if name == "_type":
                types = (types or set()) | {t for t in value.split(",") if t}
            elif name == "_since":
                try:
                    since = parse_date_range(value)[0]
                except ValueError:
                    raise FhirHttpError(400, "invalid", "_since must be a FHIR instant") from None
        members = self.store.compartment(pid)
        refs: dict[tuple[str, str], None] = {}
        for resource in members:
            for value in _all_references(resource):
                key = reference_key(value)
                if key and key[0] in SHARED_TYPES:
                    refs.setdefault(key, None)
        shared = [r for r in (self.store.get(*k) for k in refs) if r is not None]
        results = []
        for resource in [*members, *shared]:
            if types is not None and resource["resourceType"] not in types:
                continue
            if since is not None and parse_date_range(resource["meta"]["lastUpdated"])[0] <= since:
                continue
            if resource["resourceType"] in self.types and self._visible(token, resource):
                results.append(resource)
        return fhir_response(
            self._bundle(
                token,
                params,
                results,
                count,
                offset,
                False,
                [],
                [],
                path=f"{self.base}/Patient/{pid}/$everything",
            )
        )


def _wants_fhir(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    fmt = request.query_params.get("_format")
    if fmt:
        return True
    return not accept or any(t in accept for t in (FHIR_JSON, "application/json", "*/*"))


def _http_date(instant: str | None) -> str:
    if not instant:
        return ""
    return email.utils.format_datetime(parse_date_range(instant)[0], usegmt=True)


def _paging(params: list[tuple[str, str]]) -> tuple[int, int, bool]:
    count, offset, summary_count = DEFAULT_PAGE_SIZE, 0, False
    for name, value in params:
        if name == "_count":
            if not value.isdigit():
                raise FhirHttpError(400, "invalid", "_count must be a non-negative integer")
            count = min(int(value), MAX_PAGE_SIZE)
            if count == 0:
                summary_count = True
                count = DEFAULT_PAGE_SIZE
        elif name == "_offset":
            if not value.isdigit():
                raise FhirHttpError(400, "invalid", "_offset must be a non-negative integer")
            offset = int(value)
        elif name == "_summary":
            if value == "count":
                summary_count = True
            elif value != "false":
                raise FhirHttpError(400, "not-supported", "_summary supports count and false")
        elif name == "_total" and value not in ("none", "estimate", "accurate"):
            raise FhirHttpError(400, "invalid", "_total must be none, estimate or accurate")
    return count, offset, summary_count


def _parse_includes(
    params: list[tuple[str, str]], name: str, rtype: str | None
) -> list[tuple[str, str, str | None]]:
    out = []
    for key, value in params:
        if key.split(":")[0] != name:
            continue
        if key != name:
            raise FhirHttpError(400, "not-supported", f"{key} is not supported")
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise FhirHttpError(400, "invalid", f"{name} must be Type:param[:Target]")
        source, pname = parts[0], parts[1]
        if rtype is not None and source != rtype:
            raise FhirHttpError(400, "invalid", f"{name} must start with {rtype}:")
        param = params_for(source).get(pname)
        if param is None or param.kind != "reference":
            raise FhirHttpError(400, "not-supported", f"{value} is not a supported {name}")
        out.append((source, pname, parts[2] if len(parts) == 3 else None))
    return out


def _parse_sort(params: list[tuple[str, str]], rtype: str) -> list[tuple[str, bool]]:
    out = []
    for key, value in params:
        if key != "_sort":
            continue
        for item in value.split(","):
            desc = item.startswith("-")
            name = item.lstrip("-")
            if name not in _SORTABLE or name not in params_for(rtype):
                raise FhirHttpError(400, "not-supported", f"_sort on {name!r} is not supported")
            out.append((name, desc))
    return out


def _sorted(results: list[Resource], sort: list[tuple[str, bool]], rtype: str) -> list[Resource]:
    low = datetime(1, 1, 1, tzinfo=UTC)
    for name, desc in reversed(sort):
        param = params_for(rtype)[name]

        def key(resource: Resource, param: Any = param) -> Any:
            if param.kind != "date":
                return str(element_values(resource, param.paths[0])[:1])
            values = [v for p in param.paths for v in element_values(resource, p)]
            for v in values:
                text = (
                    v if isinstance(v, str) else (v.get("start") if isinstance(v, dict) else None)
                )
                if text:
                    try:
                        return parse_date_range(text)[0]
                    except ValueError:
                        continue
            return low

        results = sorted(results, key=key, reverse=desc)
    return results


def _all_references(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _all_references(v)
    elif isinstance(value, list):
        for item in value:
            yield from _all_references(item)


# ---------------------------------------------------------------------------------------------
# Admin API (loopback + shared secret)
# ---------------------------------------------------------------------------------------------
def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Admin:
    def __init__(
        self,
        store: FhirStore,
        auth: AuthServer,
        secret: str,
        evolver: Callable[[int], ChangeSet] | None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.secret = secret
        self.evolver = evolver

    def routes(self) -> list[Route]:
        return [
            Route("/clients", self.add_client, methods=["POST"]),
            Route("/clients/{client_id}", self.get_client, methods=["GET"]),
            Route("/expire-tokens", self.expire_tokens, methods=["POST"]),
            Route("/revoke-grant", self.revoke_grant, methods=["POST"]),
            Route("/grants", self.list_grants, methods=["GET"]),
            Route("/launch", self.launch, methods=["POST"]),
            Route("/config", self.set_config, methods=["POST"]),
            Route("/apply-changes", self.apply_changes, methods=["POST"]),
        ]

    async def _guard(self, request: Request) -> dict[str, Any]:
        given = request.headers.get(ADMIN_HEADER, "")
        if (
            not _is_loopback(request)
            or not self.secret
            or not hmac.compare_digest(given.encode(), self.secret.encode())
        ):
            raise FhirHttpError(403, "forbidden", "admin API: loopback and admin secret only")
        if request.method != "POST":
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise FhirHttpError(400, "invalid", "admin API: the body must be JSON") from None
        if not isinstance(body, dict):
            raise FhirHttpError(400, "invalid", "admin API: the body must be a JSON object")
        return body

    async def add_client(self, request: Request) -> Response:
        body = await self._guard(request)
        try:
            reg, secret = self.auth.register_client(body)
        except ValueError as exc:
            raise FhirHttpError(400, "invalid", str(exc)) from None
        out = reg.public_view()
        if secret:
            out["client_secret"] = secret
        return JSONResponse(out, status_code=201)

    async def get_client(self, request: Request) -> Response:
        await self._guard(request)
        reg = self.auth.get_client(request.path_params["client_id"])
        if reg is None:
            raise FhirHttpError(404, "not-found", "no such client")
        return JSONResponse(reg.public_view())

    async def expire_tokens(self, request: Request) -> Response:
        body = await self._guard(request)
        n = self.auth.expire_tokens(client_id=body.get("client_id"), grant_id=body.get("grant_id"))
        return JSONResponse({"expired": n})

    async def revoke_grant(self, request: Request) -> Response:
        body = await self._guard(request)
        n = self.auth.revoke_grants(
            grant_id=body.get("grant_id"),
            client_id=body.get("client_id"),
            patient=body.get("patient"),
        )
        return JSONResponse({"revoked": n})

    async def list_grants(self, request: Request) -> Response:
        await self._guard(request)
        return JSONResponse({"grants": self.auth.grants()})

    async def launch(self, request: Request) -> Response:
        body = await self._guard(request)
        allowed = {
            "patient",
            "encounter",
            "user",
            "fhir_context",
            "intent",
            "need_patient_banner",
            "smart_style_url",
            "auto_approve",
        }
        unknown = set(body) - allowed
        if unknown:
            raise FhirHttpError(400, "invalid", f"unknown launch fields: {sorted(unknown)}")
        launch = self.auth.mint_launch(**body)
        return JSONResponse({"launch": launch, "iss": self.auth.fhir_base}, status_code=201)

    async def set_config(self, request: Request) -> Response:
        body = await self._guard(request)
        for key, value in body.items():
            if not hasattr(self.auth.config, key) or not isinstance(value, int | bool):
                raise FhirHttpError(400, "invalid", f"unknown or invalid config field {key!r}")
            setattr(self.auth.config, key, value)
        return JSONResponse({k: getattr(self.auth.config, k) for k in body})

    async def apply_changes(self, request: Request) -> Response:
        body = await self._guard(request)
        if "step" in body:
            if self.evolver is None:
                raise FhirHttpError(400, "not-supported", "no population evolver is attached")
            upserts, deletes = self.evolver(int(body["step"]))
        else:
            upserts = list(body.get("upserts") or [])
            deletes = [(d["resourceType"], d["id"]) for d in body.get("deletes") or []]
        stored = 0
        for resource in upserts:
            try:
                self.store.put(resource)
            except ValueError as exc:
                raise FhirHttpError(400, "invalid", str(exc)) from None
            stored += 1
            if resource.get("resourceType") == "Patient":
                self.auth.patient_names[resource["id"]] = _display_name(resource)
        deleted = sum(1 for t, i in deletes if self.store.delete(t, i))
        return JSONResponse({"upserted": stored, "deleted": deleted})

"""The FHIR R4 REST API of one sandbox EHR organization: SMART discovery, the CapabilityStatement,
read, vread, history, search (GET and POST, `_include`, `_sort`, paging) and `Patient/$everything`,
each checked against the token's SMART scopes and the Patient compartment.
"""

import base64
import urllib.parse
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from medblocks_sandbox.auth import AuthServer, bearer_challenge, require_token
from medblocks_sandbox.auth_model import TokenInfo
from medblocks_sandbox.ehr_common import (
    FHIR_JSON,
    FHIR_VERSION,
    _all_references,
    _check_accept,
    _http_date,
    _paging,
    _parse_includes,
    _parse_sort,
    _sorted,
    _wants_fhir,
    fhir_response,
)
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
from medblocks_sandbox.smart_scopes import AccessGrant

# ---------------------------------------------------------------------------------------------
# FHIR REST
# ---------------------------------------------------------------------------------------------


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

"""The `$export` kick-off (system, Patient and Group level; GET or POST `Parameters`): headers,
parameters (`_outputFormat`, `_since`, `_type`, `_typeFilter`, `_elements`, `patient`, the
STU3 ones) and the export plan.
"""

import contextlib
import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from medblocks_sandbox.bulk_auth import TokenInfo, can_read, has_system_read
from medblocks_sandbox.bulk_export import ExportWorker
from medblocks_sandbox.bulk_jobs import ExportPlan, _patient_level_type
from medblocks_sandbox.bulk_source import _is_resource_type, _parse_instant
from medblocks_sandbox.bulk_stu3 import (
    parse_options,
)
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.faults import (
    operation_outcome,
    outcome_response,
)
from medblocks_sandbox.fhir_match import compile_filters, reference_key
from medblocks_sandbox.profiles import GROUP, PATIENT, SYSTEM

#: ``_outputFormat`` values a server must accept (SPECS 3.1).
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
#: Kick-off parameters this server implements (Bulk Data STU2).
SUPPORTED_PARAMS = frozenset(
    {
        "_outputFormat",
        "_since",
        "_type",
        "_typeFilter",
        "_elements",
        "patient",
        # STU3 (bulk_stu3.py)
        "organizeOutputBy",
        "includeAssociatedData",
        "allowPartialManifests",
    }
)


_ELEMENT_RE = re.compile(r"^(?:(?P<type>[A-Z][A-Za-z]+)\.)?(?P<element>[a-z][A-Za-z0-9]*)$")


_TYPE_FILTER_SPLIT = re.compile(r",(?=[A-Z][A-Za-z]+\?)")


class KickoffEndpoints(ExportWorker):
    """`$export`, `Patient/$export` and `Group/{id}/$export`."""

    # -- kick-off -----------------------------------------------------------------------------
    async def _kickoff_system(self, request: Request) -> Response:
        return await self._kickoff(request, SYSTEM, None)

    async def _kickoff_patient(self, request: Request) -> Response:
        return await self._kickoff(request, PATIENT, None)

    async def _kickoff_group(self, request: Request) -> Response:
        return await self._kickoff(request, GROUP, request.path_params["group_id"])

    async def _kickoff(self, request: Request, level: str, group_id: str | None) -> Response:
        try:
            token = await self._authenticate(request)
            if not has_system_read(token.scopes):
                raise FhirHttpError(403, "forbidden", "bulk export needs system read scopes")
            if level not in self.profile.levels:
                raise FhirHttpError(
                    404, "not-supported", f"{level}-level export is not supported by this server"
                )
            self._check_kickoff_headers(request)
            lenient = "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")
            params = await self._read_params(request)
            plan = await run_in_threadpool(
                self._plan, params, level, group_id, token, lenient, request.method
            )
            job = self._start_job(request, token, plan)
        except FhirHttpError as exc:
            return outcome_response(exc.status, exc.code, str(exc), headers=exc.headers)
        except (OSError, ValueError) as exc:  # the source could not be read (bad file on disk)
            return outcome_response(500, "exception", f"kick-off failed: {type(exc).__name__}")
        # Built from the request rather than url_for: several orgs' apps mounted side by side
        # share route names, and url_for would answer with the first org's prefix.
        status_url = f"{job.fhir_base}/bulk-status/{job.id}"
        return JSONResponse(
            operation_outcome("informational", "export accepted", severity="information"),
            status_code=202,
            headers={"Content-Location": status_url},
            media_type="application/fhir+json",
        )

    def _check_kickoff_headers(self, request: Request) -> None:
        accept = [a.split(";")[0].strip() for a in request.headers.get("accept", "").split(",")]
        if "application/fhir+json" not in accept:
            raise FhirHttpError(400, "invalid", "kick-off requires Accept: application/fhir+json")
        prefer = [p.strip() for p in request.headers.get("prefer", "").split(",")]
        if "respond-async" not in prefer:
            raise FhirHttpError(400, "invalid", "kick-off requires Prefer: respond-async")

    async def _read_params(self, request: Request) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = list(request.query_params.multi_items())
        if request.method != "POST":
            return params
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in ("application/fhir+json", "application/json"):
            raise FhirHttpError(415, "invalid", "POST kick-off needs a FHIR JSON Parameters body")
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise FhirHttpError(400, "invalid", "the kick-off body is not JSON") from None
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise FhirHttpError(400, "invalid", "the kick-off body must be a Parameters resource")
        for item in body.get("parameter") or []:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise FhirHttpError(400, "invalid", "each parameter needs a name")
            values = [v for k, v in item.items() if k.startswith("value")]
            if len(values) != 1:
                raise FhirHttpError(400, "invalid", f"parameter {item['name']} needs one value[x]")
            value = values[0]
            if item["name"] == "patient":
                ref = value.get("reference") if isinstance(value, dict) else None
                key = reference_key(ref) if isinstance(ref, str) else None
                if key is None or key[0] != "Patient":
                    raise FhirHttpError(
                        400, "invalid", "patient needs a valueReference to a Patient"
                    )
                params.append(("patient", key[1]))
            else:
                kind = next(k for k in item if k.startswith("value"))
                params.append((item["name"], _parameter_value(item["name"], kind, value)))
        return params

    def _all_types(self) -> list[str]:
        return list(self.source.resource_types())

    def _plan(
        self,
        params: list[tuple[str, Any]],
        level: str,
        group_id: str | None,
        token: TokenInfo,
        lenient: bool,
        method: str,
    ) -> ExportPlan:
        profile = self.profile
        issues: list[dict[str, Any]] = []
        grouped: dict[str, list[str]] = {}
        for name, value in params:
            grouped.setdefault(name, []).append(value)
        for name in list(grouped):
            if name in profile.unsupported_params:
                raise FhirHttpError(400, "not-supported", f"parameter {name} is not supported")
            if name not in SUPPORTED_PARAMS:
                if not lenient:
                    raise FhirHttpError(400, "not-supported", f"parameter {name} is not supported")
                issues.append(
                    operation_outcome(
                        "not-supported", f"parameter {name} was ignored", severity="warning"
                    )
                )
                del grouped[name]

        if "patient" in grouped and method != "POST":
            raise FhirHttpError(400, "invalid", "patient is only allowed in a POST kick-off")
        if "patient" in grouped and level == SYSTEM:
            raise FhirHttpError(400, "invalid", "patient does not apply to a system export")

        formats = grouped.get("_outputFormat", [])
        if any(f not in OUTPUT_FORMATS for f in formats):
            raise FhirHttpError(400, "not-supported", "_outputFormat must be NDJSON")

        since = None
        if "_since" in grouped:
            if len(grouped["_since"]) > 1:
                raise FhirHttpError(400, "invalid", "_since given more than once")
            since = _parse_instant(grouped["_since"][0])

        # Types: repeated values mean the same as comma-joined ones (the spec), except where
        # a vendor refuses the repetition (Oracle).
        type_values = grouped.get("_type", [])
        if len(type_values) > 1 and profile.reject_repeated_type:
            raise FhirHttpError(400, "invalid", "_type may be given only once")
        requested: list[str] = []
        for value in type_values:
            for name in value.split(","):
                name = name.strip()
                if not name:
                    raise FhirHttpError(400, "invalid", "_type has an empty entry")
                if not _is_resource_type(name):
                    if not lenient:
                        raise FhirHttpError(400, "invalid", f"{name} is not a resource type")
                    issues.append(
                        operation_outcome(
                            "not-supported", f"_type {name} was ignored", severity="warning"
                        )
                    )
                    continue
                if name not in requested:
                    requested.append(name)
        type_given = bool(type_values)
        if profile.allowed_types is not None:
            bad = [t for t in requested if t not in profile.allowed_types]
            if bad:
                raise FhirHttpError(400, "not-supported", f"_type not supported: {bad[0]}")
        if (
            profile.reference_types_need_clinical
            and requested
            and all(t in profile.reference_types_need_clinical for t in requested)
        ):
            raise FhirHttpError(400, "invalid", "reference types need a clinical type alongside")

        if type_given:
            denied = [t for t in requested if not can_read(token.scopes, t)]
            if denied:
                raise FhirHttpError(403, "forbidden", f"no read scope for {denied[0]}")
            types = requested
            if level != SYSTEM:
                # A patient-level export holds the patients' compartments and the shared
                # resources they reference; other types have nothing to give.
                outside = [t for t in types if not _patient_level_type(t)]
                types = [t for t in types if _patient_level_type(t)]
                issues.extend(
                    operation_outcome(
                        "not-supported",
                        f"{t} is outside the patient compartment",
                        severity="information",
                    )
                    for t in outside
                )
        else:
            available = self._all_types()
            if level != SYSTEM:
                available = [t for t in available if _patient_level_type(t)]
            types = []
            for t in available:
                if can_read(token.scopes, t):
                    types.append(t)
                else:
                    issues.append(
                        operation_outcome(
                            "forbidden", f"{t} omitted: not authorised", severity="information"
                        )
                    )

        type_filters = self._parse_type_filters(
            grouped.get("_typeFilter", []), types, type_given, lenient, issues
        )
        elements = self._parse_elements(grouped.get("_elements", []), lenient, issues)
        stu3 = parse_options(grouped, level, lenient, issues)

        patient_ids: set[str] | None = None
        late: set[str] = set()
        if level == GROUP:
            assert group_id is not None
            group = self.source.get("Group", group_id)
            if group is None:
                raise FhirHttpError(404, "not-found", f"Group/{group_id} is not known")
            patient_ids, late = _group_members(group, since)
        elif level == PATIENT:
            patient_ids = {r["id"] for r in self.source.iter_type("Patient") if "id" in r}
        if "patient" in grouped:
            assert patient_ids is not None
            asked = set(grouped["patient"])
            known = (
                patient_ids
                if level == PATIENT
                else {r["id"] for r in self.source.iter_type("Patient") if "id" in r}
            )
            unknown = sorted(asked - known)
            if unknown:
                if not lenient:
                    raise FhirHttpError(400, "not-found", "a requested patient is not known here")
                issues.append(
                    operation_outcome(
                        "not-found",
                        f"{len(unknown)} requested patient(s) not found",
                        severity="warning",
                    )
                )
            patient_ids &= asked
            late &= asked
        return ExportPlan(
            level,
            group_id,
            types,
            since,
            type_filters,
            elements,
            patient_ids,
            late,
            issues,
            type_given,
            token.scopes,
            stu3,
        )

    def _parse_type_filters(
        self,
        values: list[str],
        types: list[str],
        type_given: bool,
        lenient: bool,
        issues: list[dict[str, Any]],
    ) -> dict[str, list[list[Any]]]:
        profile = self.profile
        if values and profile.type_filter_requires_type and not type_given:
            raise FhirHttpError(400, "invalid", "_typeFilter needs _type")
        out: dict[str, list[list[Any]]] = {}
        for value in values:
            for query in _TYPE_FILTER_SPLIT.split(value):
                rtype, sep, qs = query.partition("?")
                if not sep or not _is_resource_type(rtype):
                    raise FhirHttpError(400, "invalid", "_typeFilter entries are Type?query")
                if type_given and rtype not in types:
                    raise FhirHttpError(400, "invalid", f"_typeFilter type {rtype} not in _type")
                if rtype in profile.unfilterable_types:
                    raise FhirHttpError(400, "not-supported", f"{rtype} cannot be filtered")
                pairs = parse_qsl(qs, keep_blank_values=True)
                if not pairs:
                    raise FhirHttpError(400, "invalid", "_typeFilter query is empty")
                for name, _ in pairs:
                    base = name.partition(":")[0]
                    if base in profile.blocked_filter_params:
                        raise FhirHttpError(
                            400, "not-supported", f"{base} is not allowed in _typeFilter"
                        )
                    if name.startswith("_") and name not in ("_id", "_lastUpdated"):
                        # _include, _sort, _count... are not filters (SPECS 3.1).
                        raise FhirHttpError(400, "invalid", f"{name} is not allowed in _typeFilter")
                try:
                    compiled = compile_filters(rtype, pairs)
                except FhirHttpError:
                    if not lenient:
                        raise
                    issues.append(
                        operation_outcome(
                            "not-supported",
                            f"a _typeFilter for {rtype} was ignored",
                            severity="warning",
                        )
                    )
                    continue
                if profile.type_filter_one_per_type and rtype in out:
                    raise FhirHttpError(400, "invalid", f"one _typeFilter per type ({rtype})")
                out.setdefault(rtype, []).append(compiled)
        return out

    def _parse_elements(
        self, values: list[str], lenient: bool, issues: list[dict[str, Any]]
    ) -> dict[str | None, set[str]]:
        out: dict[str | None, set[str]] = {}
        for value in values:
            for item in value.split(","):
                match = _ELEMENT_RE.match(item.strip())
                if not match or (match["type"] and not _is_resource_type(match["type"])):
                    if not lenient:
                        raise FhirHttpError(
                            400, "invalid", "_elements entries are element or Type.element"
                        )
                    issues.append(
                        operation_outcome(
                            "not-supported", "an _elements entry was ignored", severity="warning"
                        )
                    )
                    continue
                out.setdefault(match["type"], set()).add(match["element"])
        return out


#: The value[x] the Bulk Data IG gives each POST kick-off parameter (besides ``valueString``).
_PARAMETER_TYPES = {
    "_since": "valueInstant",
    "_until": "valueInstant",
    "includeAssociatedData": "valueCode",
    "allowPartialManifests": "valueBoolean",
}


def _parameter_value(name: str, kind: str, value: Any) -> str:
    """A POST parameter's value as the query-string text the planner reads; 400 for a value[x]
    the IG does not give that parameter."""
    allowed = {"valueString", _PARAMETER_TYPES.get(name, "valueString")}
    if kind not in allowed:
        raise FhirHttpError(400, "invalid", f"parameter {name} cannot be a {kind}")
    if kind == "valueBoolean":
        if not isinstance(value, bool):
            raise FhirHttpError(400, "invalid", f"parameter {name} must be a boolean")
        return "true" if value else "false"
    if not isinstance(value, str):
        raise FhirHttpError(400, "invalid", f"parameter {name} must be a string")
    return value


def _group_members(group: dict[str, Any], since: datetime | None) -> tuple[set[str], set[str]]:
    members: set[str] = set()
    late: set[str] = set()
    for member in group.get("member") or []:
        if not isinstance(member, dict) or member.get("inactive") is True:
            continue
        ref = (member.get("entity") or {}).get("reference")
        key = reference_key(ref) if isinstance(ref, str) else None
        if key is None or key[0] != "Patient":
            continue
        members.add(key[1])
        start = (member.get("period") or {}).get("start")
        if since is not None and isinstance(start, str):
            with contextlib.suppress(ValueError):
                joined = datetime.fromisoformat(start.replace("Z", "+00:00"))
                if (joined if joined.tzinfo else joined.replace(tzinfo=UTC)) > since:
                    late.add(key[1])
    return members, late

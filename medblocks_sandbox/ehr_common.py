"""What the parts of the sandbox EHR app share: its constants and `OrgConfig`, FHIR responses
(OperationOutcome, `application/fhir+json`), and the search-result helpers (paging, `_include`,
`_sort`, HTTP dates).
"""

import email.utils
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from medblocks_sandbox.auth_model import Login
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_match import (
    element_values,
    parse_date_range,
)
from medblocks_sandbox.fhir_params import Resource, params_for
from medblocks_sandbox.fhir_write_checks import accepts_json

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


_SORTABLE = {"_lastUpdated", "_id", "date", "authoredon", "birthdate", "service-date"}


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

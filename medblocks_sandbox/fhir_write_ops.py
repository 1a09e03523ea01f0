"""The vocabulary of the sandbox's FHIR writes: limits, the Bundle/entry/request keys allowed,
`WriteError` (an entry's 4xx as an OperationOutcome), a parsed entry (`_Op`), its result, and
the `application/fhir+json` response.
"""

import http
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from medblocks_sandbox.auth_model import TokenInfo
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.smart_scopes import AccessGrant

FHIR_JSON = "application/fhir+json"
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 100  # JSON nesting; real resources stay far below, the checks below recurse

#: `allowed(grants, resource)`: whether one of the grants covers this resource (by its content).
AllowedCheck = Callable[[Sequence[AccessGrant], Resource], bool]
#: `forbid(token, type, letter)`: the 403 `insufficient_scope` error for a missing permission.
Forbid = Callable[[TokenInfo, str, str], FhirHttpError]

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_UUID_URN_RE = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_OID_URN_RE = re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+")
_ETAG_RE = re.compile(r'(?:W/)?"([1-9][0-9]*)"')
_DIV_LINK_RE = re.compile(r'(\s(?:href|src)=")(urn:(?:uuid|oid):[^"]+)(")')

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})
_WRITES = frozenset({"POST", "PUT", "DELETE"})
# FHIR R4 http.html §3.1.0.11.2: DELETE, then POST, then PUT/PATCH, then GET/HEAD.
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3, "HEAD": 3}
_BUNDLE_KEYS = frozenset(
    {
        "resourceType",
        "id",
        "meta",
        "implicitRules",
        "language",
        "identifier",
        "type",
        "timestamp",
        "total",
        "link",
        "entry",
        "signature",
    }
)
_ENTRY_KEYS = frozenset(
    {
        "id",
        "extension",
        "modifierExtension",
        "link",
        "fullUrl",
        "resource",
        "search",
        "request",
        "response",
    }
)
_REQUEST_KEYS = frozenset(
    {
        "id",
        "extension",
        "modifierExtension",
        "method",
        "url",
        "ifNoneMatch",
        "ifModifiedSince",
        "ifMatch",
        "ifNoneExist",
    }
)


class WriteError(Exception):
    """A failed write: answered as an OperationOutcome with HTTP `status` (or a batch entry)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        expression: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.expression = expression
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, exc: FhirHttpError, expression: str | None = None) -> "WriteError":
        return cls(exc.status, exc.code, str(exc), expression=expression, headers=exc.headers)

    def outcome(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": "error", "code": self.code, "diagnostics": str(self)}
        if self.expression:
            issue["expression"] = [self.expression]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


@dataclass
class _Op:
    """One entry of a Bundle (or one REST call), parsed and checked, ready to apply."""

    index: int
    method: str  # GET HEAD POST PUT DELETE
    rtype: str
    rid: str  # for POST: the id the server assigned
    where: str | None  # FHIRPath of the Bundle entry (None for a REST call)
    resource: Resource | None = None  # POST/PUT: the content to store (server meta removed)
    full_url: str | None = None
    if_match: str | None = None  # the version id an If-Match names

    def at(self, path: str) -> str | None:
        """The FHIRPath of `path` inside the entry (`request.ifMatch`), None for REST calls."""
        return f"{self.where}.{path}" if self.where else None


@dataclass
class _Result:
    status: int
    resource: Resource | None = None  # stored (POST/PUT) or read (GET) content
    version: str | None = None
    last_modified: str | None = None  # FHIR instant
    read: bool = False  # a GET/HEAD entry


def status_line(status: int) -> str:
    """`201 Created`: the `Bundle.entry.response.status` form of an HTTP status."""
    return f"{status} {http.HTTPStatus(status).phrase}"


def fhir_json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A FHIR JSON answer (`application/fhir+json`)."""
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=FHIR_JSON,
        headers=dict(headers or {}),
    )

"""FHIR R4 writes for the sandbox EHR: transaction and batch Bundles, REST create/update/delete.

What the routes do (FHIR R4 http.html; SMART App Launch v2 permission letters)::

    POST   [base]              Bundle `transaction` (all or nothing) or `batch` (entry by entry)
    POST   [base]/{type}       create: the server assigns the id (an id in the body is ignored)
    PUT    [base]/{type}/{id}  update, or update-as-create when the resource is absent or deleted
    DELETE [base]/{type}/{id}  delete: 204 whether the resource existed or not (idempotent)

Strict on purpose, since clients are tested against it: the body must be `application/fhir+json`
(or `application/json`) holding JSON without duplicate keys, and every written resource must pass
the `fhir.resources` R4B model plus the JSON rules the models let through (no `null`, no empty
objects or arrays). Conditional create/update/delete, PATCH and searches inside Bundles are not
supported and say so rather than doing something else. The server stamps `meta.versionId` and
`meta.lastUpdated` (incoming values are dropped); `If-Match` / `request.ifMatch` (`W/"n"`) must
name the current version, else 412.

Transactions: every entry is checked first (URL, body, ids, `fullUrl`s, no resource touched by two
entries, R4B validity, permissions, preconditions), then DELETEs, POSTs, PUTs and GETs apply in that
order under `FhirStore.atomic()`; any failure answers that entry's 4xx and changes nothing.
`urn:uuid:`/`urn:oid:` `fullUrl`s of POST and PUT entries are rewritten to `Type/id` wherever
they appear in the other entries' resources (references, uri elements, narrative links).

Permissions: create needs `c`, update of an existing resource needs `u` on both its current and
new content (a patient-context token cannot move a resource out of its compartment),
update-as-create needs `c`, delete needs `d`, a GET entry `r`; the compartment is decided from the
resource content by the `allowed` helper the app passes in (the same check reads use).
"""

import email.utils
import http
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from medblocks_sandbox.auth import require_token
from medblocks_sandbox.auth_model import TokenInfo
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_match import parse_date_range
from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.fhir_store import FhirStore, format_instant
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


class FhirWrites:
    """The write side of one organization's FHIR API (handlers for `create_ehr_app` routes).

    `allowed(grants, resource)` and `forbid(token, type, letter)` are the read side's access
    helpers; `on_stored(resource)` is called for every stored resource (under the store lock).
    """

    def __init__(
        self,
        store: FhirStore,
        fhir_base: str,
        types: Sequence[str],
        *,
        allowed: AllowedCheck,
        forbid: Forbid,
        on_stored: Callable[[Resource], None] | None = None,
    ) -> None:
        self.store = store
        self.base = fhir_base.rstrip("/")
        self.types = frozenset(types)
        self.allowed = allowed
        self.forbid = forbid
        self.on_stored = on_stored

    # -- handlers ------------------------------------------------------------------------------
    async def bundle(self, request: Request) -> Response:
        """`POST [base]`: a `transaction` or `batch` Bundle."""
        token = require_token(request)
        try:
            _check_accept(request)
            _check_query(request)
            body = await _read_json(request)
            kind, entries = _bundle_entries(body)
            prefer = _prefer(request, "minimal")
            if kind == "transaction":
                results: list[Any] = await run_in_threadpool(self._transaction, token, entries)
            else:
                results = await run_in_threadpool(self._batch, token, entries)
        except WriteError as exc:
            return fhir_json(exc.outcome(), exc.status, exc.headers)
        out = [r if isinstance(r, dict) else _response_entry(r, prefer) for r in results]
        return fhir_json(
            {
                "resourceType": "Bundle",
                "id": str(uuid.uuid4()),
                "type": f"{kind}-response",
                "entry": out,
            }
        )

    async def create(self, request: Request) -> Response:
        """`POST [base]/{type}`."""
        rtype = request.path_params["type"]
        try:
            token = self._rest_prelude(request, rtype, None)
            if request.headers.get("if-none-exist") is not None:
                raise WriteError(400, "not-supported", "conditional create is not supported")
            self._need(token, rtype, "c", None)
            body = await _read_json(request)
            op = _write_op(None, 0, "POST", rtype, str(uuid.uuid4()), body)
            result = await run_in_threadpool(self._single, token, op)
        except WriteError as exc:
            return fhir_json(exc.outcome(), exc.status, exc.headers)
        return self._rest_answer(request, result, op)

    async def update(self, request: Request) -> Response:
        """`PUT [base]/{type}/{id}`."""
        rtype, rid = request.path_params["type"], request.path_params["id"]
        try:
            token = self._rest_prelude(request, rtype, rid)
            self._need_put(token, rtype, None)
            if_match = _if_match(request.headers.get("if-match"), None)
            body = await _read_json(request)
            op = _write_op(None, 0, "PUT", rtype, rid, body)
            op.if_match = if_match
            result = await run_in_threadpool(self._single, token, op)
        except WriteError as exc:
            return fhir_json(exc.outcome(), exc.status, exc.headers)
        return self._rest_answer(request, result, op)

    async def delete(self, request: Request) -> Response:
        """`DELETE [base]/{type}/{id}`: 204, also when the resource is absent or deleted."""
        rtype, rid = request.path_params["type"], request.path_params["id"]
        try:
            token = self._rest_prelude(request, rtype, rid)
            self._need(token, rtype, "d", None)
            op = _Op(0, "DELETE", rtype, rid, None)
            op.if_match = _if_match(request.headers.get("if-match"), None)
            result = await run_in_threadpool(self._single, token, op)
        except WriteError as exc:
            return fhir_json(exc.outcome(), exc.status, exc.headers)
        headers = {"ETag": f'W/"{result.version}"'} if result.version else {}
        return Response(status_code=204, headers=headers)

    def _rest_prelude(self, request: Request, rtype: str, rid: str | None) -> TokenInfo:
        """The checks every REST write makes first, in order; returns the caller's token."""
        self._check_type(rtype, None)
        token = require_token(request)
        _check_accept(request)
        _check_query(request)
        if rid is not None:
            _check_id(rid, None)
        return token

    # -- processing ----------------------------------------------------------------------------
    def _single(self, token: TokenInfo, op: _Op) -> _Result:
        if op.resource is not None:
            _check_local_refs(op.resource, op.rtype, in_transaction=False)
            _validate(op.resource, op.rtype)
        with self.store.atomic():
            self._check_state(token, op, {})
            return self._apply(op)

    def _transaction(self, token: TokenInfo, entries: list[Any]) -> list[_Result]:
        ops = [self._parse_entry(i, e, token) for i, e in enumerate(entries)]
        _check_unique_full_urls(ops)
        # FHIR R4 http.html §3.1.0.11.2: identities of steps 1-3 (DELETE, POST, PUT) never overlap.
        touched: dict[tuple[str, str], _Op] = {}
        for op in ops:
            if op.method not in _WRITES:
                continue
            key = (op.rtype, op.rid)
            if key in touched:
                raise WriteError(
                    400,
                    "invalid",
                    f"{op.rtype}/{op.rid} is the target of entries {touched[key].index} and "
                    f"{op.index}: a transaction may change a resource once",
                    expression=op.at("request.url"),
                )
            touched[key] = op
        # urn:uuid / urn:oid fullUrls of created or updated resources become Type/id everywhere.
        local = {
            op.full_url: f"{op.rtype}/{op.rid}"
            for op in ops
            if op.method in ("POST", "PUT") and op.full_url and op.full_url.startswith("urn:")
        }
        for op in ops:
            if op.resource is None:
                continue
            if local:
                op.resource = _rewrite(op.resource, local)
            _check_local_refs(op.resource, f"{op.where}.resource", in_transaction=True)
            _validate(op.resource, f"{op.where}.resource")
        with self.store.atomic():
            for op in ops:
                self._check_state(token, op, touched)
            results: dict[int, _Result] = {}
            for op in sorted(ops, key=lambda o: (_ORDER[o.method], o.index)):
                results[op.index] = self._apply(op)
        return [results[i] for i in range(len(ops))]

    def _batch(self, token: TokenInfo, entries: list[Any]) -> list[_Result | dict[str, Any]]:
        seen: set[str] = set()
        for n, entry in enumerate(entries):
            url = entry.get("fullUrl") if isinstance(entry, dict) else None
            if isinstance(url, str) and url in seen:
                raise WriteError(
                    400,
                    "invalid",
                    "two entries have the same fullUrl (bdl-7)",
                    expression=f"Bundle.entry[{n}].fullUrl",
                )
            if isinstance(url, str):
                seen.add(url)
        out: list[_Result | dict[str, Any]] = []
        for i, entry in enumerate(entries):
            try:
                op = self._parse_entry(i, entry, token)
                if op.resource is not None:
                    # Batch entries are independent: no reference between them is resolved.
                    _check_local_refs(op.resource, f"{op.where}.resource", in_transaction=False)
                    _validate(op.resource, f"{op.where}.resource")
                with self.store.atomic():
                    self._check_state(token, op, {})
                    out.append(self._apply(op))
            except WriteError as exc:
                out.append(
                    {"response": {"status": status_line(exc.status), "outcome": exc.outcome()}}
                )
        return out

    def _parse_entry(self, index: int, entry: Any, token: TokenInfo) -> _Op:
        where = f"Bundle.entry[{index}]"
        if not isinstance(entry, dict):
            raise WriteError(400, "structure", "an entry must be a JSON object", expression=where)
        _check_keys(entry, _ENTRY_KEYS, where)
        for name, rule in (("search", "bdl-2"), ("response", "bdl-4")):
            if name in entry:
                raise WriteError(
                    400,
                    "invalid",
                    f"entry.{name} is not allowed in a transaction or batch ({rule})",
                    expression=f"{where}.{name}",
                )
        request = entry.get("request")
        if not isinstance(request, dict):
            raise WriteError(
                400,
                "required",
                "entry.request (method and url) is required in a transaction or batch (bdl-3)",
                expression=f"{where}.request",
            )
        _check_keys(request, _REQUEST_KEYS, f"{where}.request")
        method = request.get("method")
        if not isinstance(method, str) or method not in _METHODS:
            raise WriteError(
                400,
                "required" if method is None else "value",
                "request.method must be GET, HEAD, POST, PUT, DELETE or PATCH",
                expression=f"{where}.request.method",
            )
        if method == "PATCH":
            raise WriteError(
                405, "not-supported", "PATCH is not supported", expression=f"{where}.request.method"
            )
        url = request.get("url")
        if not isinstance(url, str) or not url:
            raise WriteError(
                400, "required", "request.url is required", expression=f"{where}.request.url"
            )
        for name in ("ifNoneExist", "ifNoneMatch", "ifModifiedSince"):
            if name in request:
                raise WriteError(
                    400,
                    "not-supported",
                    f"request.{name} (a conditional {method}) is not supported",
                    expression=f"{where}.request.{name}",
                )
        rtype, rid = self._parse_url(url, method, f"{where}.request.url")
        if_match = None
        if "ifMatch" in request:
            if method not in ("PUT", "DELETE"):
                raise WriteError(
                    400,
                    "invalid",
                    "request.ifMatch applies to PUT and DELETE only",
                    expression=f"{where}.request.ifMatch",
                )
            if_match = _if_match(request["ifMatch"], f"{where}.request.ifMatch")
        if method == "PUT":
            self._need_put(token, rtype, where)
        else:
            self._need(token, rtype, {"POST": "c", "DELETE": "d"}.get(method, "r"), where)
        full_url = entry.get("fullUrl")
        if full_url is not None:
            _check_full_url(full_url, f"{where}.fullUrl")
        if method in ("POST", "PUT"):
            resource = entry.get("resource")
            if resource is None:
                raise WriteError(
                    400, "required", f"a {method} entry needs a resource", expression=where
                )
            if full_url and not full_url.startswith("urn:") and isinstance(resource, dict):
                _check_full_url_agrees(full_url, resource, f"{where}.fullUrl")
            op = _write_op(where, index, method, rtype, rid or str(uuid.uuid4()), resource)
        else:
            assert rid is not None
            op = _Op(index, method, rtype, rid, where)
        op.full_url = full_url
        op.if_match = if_match
        return op

    def _parse_url(self, url: str, method: str, where: str) -> tuple[str, str | None]:
        rel = url
        if "://" in url:
            if not url.startswith(self.base + "/"):
                raise WriteError(
                    400,
                    "not-supported",
                    "request.url must be relative to this server's base",
                    expression=where,
                )
            rel = url[len(self.base) + 1 :]
        if "?" in rel or "#" in rel:
            raise WriteError(
                400,
                "not-supported",
                "conditional operations and searches are not supported in Bundles",
                expression=where,
            )
        parts = rel.split("/")
        if len(parts) != (1 if method == "POST" else 2) or not _TYPE_RE.fullmatch(parts[0]):
            shape = "Type" if method == "POST" else "Type/id"
            raise WriteError(
                400,
                "not-supported" if "$" in rel or "_history" in rel else "invalid",
                f"request.url of a {method} entry must be {shape} (relative to the base)",
                expression=where,
            )
        self._check_type(parts[0], where)
        if method == "POST":
            return parts[0], None
        _check_id(parts[1], where)
        return parts[0], parts[1]

    def _check_state(
        self, token: TokenInfo, op: _Op, planned: Mapping[tuple[str, str], _Op]
    ) -> None:
        """Permissions on the content involved, and If-Match; call under `store.atomic()`."""
        current = self.store.get(op.rtype, op.rid) if op.method != "POST" else None
        if op.method == "DELETE":
            grants = self._need(token, op.rtype, "d", op.where)
            if current is not None and not self.allowed(grants, current):
                raise _outside(op, "delete")
        elif op.method in ("POST", "PUT"):
            assert op.resource is not None
            if current is None:  # create, or update-as-create
                grants = self._need(token, op.rtype, "c", op.where)
                if not self.allowed(grants, op.resource):
                    raise _outside(op, "create")
            else:  # update: the old and the new content must both be within reach
                grants = self._need(token, op.rtype, "u", op.where)
                if not self.allowed(grants, current) or not self.allowed(grants, op.resource):
                    raise _outside(op, "update")
        else:  # GET / HEAD see the transaction's writes (they apply last)
            grants = self._need(token, op.rtype, "r", op.where)
            write = planned.get((op.rtype, op.rid))
            if write is not None and write.method == "DELETE":
                raise WriteError(
                    410, "deleted", f"{op.rtype}/{op.rid} is deleted by this transaction"
                )
            target = write.resource if write is not None else current
            if target is None:
                if self.store.state(op.rtype, op.rid) == "deleted":
                    raise WriteError(410, "deleted", f"{op.rtype}/{op.rid} was deleted")
                raise WriteError(404, "not-found", f"{op.rtype}/{op.rid} is not known")
            if not self.allowed(grants, target):
                raise _outside(op, "read")
        if op.if_match is not None:
            version = (current or {}).get("meta", {}).get("versionId")
            if version != op.if_match:
                now = f'the current version is W/"{version}"' if version else "it does not exist"
                raise WriteError(
                    412,
                    "conflict",
                    f'If-Match W/"{op.if_match}" fails for {op.rtype}/{op.rid}: {now}',
                    expression=op.at("request.ifMatch"),
                )

    def _apply(self, op: _Op) -> _Result:
        if op.method == "DELETE":
            if not self.store.delete(op.rtype, op.rid):
                return _Result(204)
            tomb = self.store.history(op.rtype, op.rid)[-1]
            return _Result(
                204, version=str(tomb.version_id), last_modified=format_instant(tomb.last_updated)
            )
        if op.method in ("GET", "HEAD"):
            found = self.store.get(op.rtype, op.rid)
            assert found is not None
            meta = found["meta"]
            return _Result(
                200,
                found if op.method == "GET" else None,
                meta["versionId"],
                meta["lastUpdated"],
                read=True,
            )
        assert op.resource is not None
        created = self.store.get(op.rtype, op.rid) is None
        stored = self.store.put(op.resource)
        if self.on_stored is not None:
            self.on_stored(stored)
        meta = stored["meta"]
        return _Result(201 if created else 200, stored, meta["versionId"], meta["lastUpdated"])

    def _rest_answer(self, request: Request, result: _Result, op: _Op) -> Response:
        assert result.version and result.last_modified
        headers = {
            "Location": f"{self.base}/{op.rtype}/{op.rid}/_history/{result.version}",
            "ETag": f'W/"{result.version}"',
            "Last-Modified": email.utils.format_datetime(
                parse_date_range(result.last_modified)[0], usegmt=True
            ),
        }
        prefer = _prefer(request, "representation")
        if prefer == "minimal":
            return Response(status_code=result.status, headers=headers)
        if prefer == "OperationOutcome":
            return fhir_json(_info(status_line(result.status)), result.status, headers)
        return fhir_json(result.resource, result.status, headers)

    # -- checks --------------------------------------------------------------------------------
    def _check_type(self, rtype: str, where: str | None) -> None:
        if rtype not in self.types:
            raise WriteError(
                404,
                "not-supported",
                f"resource type {rtype[:64]!r} is not served here",
                expression=where,
            )

    def _need(
        self, token: TokenInfo, rtype: str, letter: str, where: str | None
    ) -> list[AccessGrant]:
        grants = token.grants_for(rtype, letter)
        if not grants:
            raise WriteError.of(self.forbid(token, rtype, letter), where)
        return grants

    def _need_put(self, token: TokenInfo, rtype: str, where: str | None) -> None:
        # Whether `u` (update) or `c` (update-as-create) applies depends on the store: checked
        # again under the lock; a token with neither is refused at once.
        if not token.grants_for(rtype, "u") and not token.grants_for(rtype, "c"):
            raise WriteError.of(self.forbid(token, rtype, "u"), where)


def _outside(op: _Op, verb: str) -> WriteError:
    return WriteError(
        403,
        "forbidden",
        f"this token may not {verb} {op.rtype}/{op.rid}: outside its access",
        expression=op.where,
    )


def _write_op(where: str | None, index: int, method: str, rtype: str, rid: str, body: Any) -> _Op:
    """The op of a POST/PUT body: resourceType and id checked, server-owned meta dropped."""
    at = f"{where}.resource" if where else rtype
    if not isinstance(body, dict):
        raise WriteError(400, "structure", "the resource must be a JSON object", expression=where)
    given = body.get("resourceType")
    if given != rtype:
        raise WriteError(
            400,
            "required" if given is None else "invalid",
            f"resourceType must be {rtype}, the type in the URL",
            expression=f"{at}.resourceType" if where else None,
        )
    if method == "PUT":
        if body.get("id") is None:
            raise WriteError(
                400,
                "required",
                "an update needs resource.id, equal to the id in the URL",
                expression=f"{at}.id",
            )
        if body.get("id") != rid:
            raise WriteError(
                400,
                "invalid",
                "resource.id does not match the id in the URL",
                expression=f"{at}.id",
            )
    resource: Resource = json.loads(json.dumps(body))  # a private deep copy
    resource["id"] = rid  # a create ignores any id it was given (http.html#create)
    meta = resource.get("meta")
    if isinstance(meta, dict):  # the store stamps these
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            del resource["meta"]
    return _Op(index, method, rtype, rid, where, resource=resource)


def _response_entry(result: _Result, prefer: str) -> dict[str, Any]:
    """A transaction/batch-response entry; `prefer` is the Prefer `return=` value."""
    response: dict[str, Any] = {"status": status_line(result.status)}
    entry: dict[str, Any] = {}
    res = result.resource
    if res is not None and not result.read:
        response["location"] = f"{res['resourceType']}/{res['id']}/_history/{result.version}"
    if result.version:
        response["etag"] = f'W/"{result.version}"'
    if result.last_modified:
        response["lastModified"] = result.last_modified
    if res is not None and (result.read or prefer == "representation"):
        entry["resource"] = res
    if prefer == "OperationOutcome" and not result.read:
        response["outcome"] = _info(status_line(result.status))
    entry["response"] = response
    return entry


# ---------------------------------------------------------------------------------------------
# request helpers
# ---------------------------------------------------------------------------------------------
def accepts_json(request: Request) -> bool:
    """Whether `_format` and `Accept` allow a JSON answer (the only format the sandbox speaks);
    the read side (`ehr.py`) uses the same rule."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt not in ("json", "application/json", FHIR_JSON):
        return False
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    types = [a.split(";")[0].strip().lower() for a in accept.split(",")]
    return any(
        t in ("*/*", "application/*", FHIR_JSON, "application/json", "application/json+fhir")
        for t in types
    )


def _check_accept(request: Request) -> None:
    if not accepts_json(request):
        raise WriteError(406, "not-supported", "this server speaks JSON only")


def _check_query(request: Request) -> None:
    for name in request.query_params:
        if name != "_format":
            raise WriteError(
                400,
                "not-supported",
                f"parameter {name[:40]!r} is not supported here (no conditional operations)",
            )


async def _read_json(request: Request) -> Any:
    media, _, rest = request.headers.get("content-type", "").partition(";")
    if media.strip().lower() not in (FHIR_JSON, "application/json"):
        raise WriteError(
            415, "not-supported", "the body must be application/fhir+json (or application/json)"
        )
    for param in rest.split(";"):
        name, _, value = param.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"').lower()
        if name == "charset" and value not in ("utf-8", "utf8"):
            raise WriteError(415, "not-supported", "FHIR JSON is UTF-8")
        if name == "fhirversion" and value != "4.0":
            raise WriteError(415, "not-supported", "this server speaks FHIR 4.0 (fhirVersion=4.0)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise WriteError(413, "too-costly", "the body is too large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise WriteError(413, "too-costly", "the body is too large")
    try:
        data = json.loads(
            body.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise WriteError(400, "structure", "the body is not UTF-8") from None
    except RecursionError:
        raise WriteError(400, "structure", "the JSON is nested too deeply") from None
    except ValueError as exc:
        why = str(exc) if str(exc).startswith("duplicate") else "the body is not valid JSON"
        raise WriteError(400, "structure", why) from None
    if _depth(data) > MAX_DEPTH:
        raise WriteError(400, "structure", "the JSON is nested too deeply")
    return data


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate JSON property {key[:64]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _prefer(request: Request, default: str) -> str:
    for part in request.headers.get("prefer", "").split(","):
        for item in part.split(";"):
            name, _, value = item.partition("=")
            if name.strip().lower() == "return":
                value = value.strip().strip('"')
                if value in ("minimal", "representation", "OperationOutcome"):
                    return value
    return default


def _if_match(value: Any, where: str | None) -> str | None:
    if value is None:
        return None
    match = _ETAG_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise WriteError(
            400, "invalid", 'If-Match must be a version ETag such as W/"3"', expression=where
        )
    return match.group(1)


def _check_id(rid: str, where: str | None) -> None:
    if not _ID_RE.fullmatch(rid):
        raise WriteError(
            400, "invalid", "a resource id is 1-64 characters of A-Z a-z 0-9 - .", expression=where
        )


def _check_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed and k.removeprefix("_") not in allowed)
    if unknown:
        raise WriteError(
            400,
            "structure",
            f"unknown element {unknown[0][:64]!r}",
            expression=f"{where}.{unknown[0][:64]}",
        )
    if obj.get("modifierExtension"):
        raise WriteError(
            400,
            "not-supported",
            "modifier extensions are not understood here",
            expression=f"{where}.modifierExtension",
        )


def _bundle_entries(body: Any) -> tuple[str, list[Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise WriteError(400, "invalid", "POST to the base takes a Bundle")
    _check_keys(body, _BUNDLE_KEYS, "Bundle")
    kind = body.get("type")
    if kind not in ("transaction", "batch"):
        raise WriteError(
            400,
            "invalid",
            "the Bundle type must be transaction or batch",
            expression="Bundle.type",
        )
    if "total" in body:
        raise WriteError(400, "invalid", "Bundle.total is for searchset and history (bdl-1)")
    entries = body.get("entry", [])
    if not isinstance(entries, list):
        raise WriteError(
            400, "structure", "Bundle.entry must be an array", expression="Bundle.entry"
        )
    return kind, entries


def _check_full_url(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise WriteError(400, "invalid", "fullUrl must be a non-empty string", expression=where)
    if value.startswith("urn:"):
        if not (_UUID_URN_RE.fullmatch(value) or _OID_URN_RE.fullmatch(value)):
            raise WriteError(
                400,
                "invalid",
                "a urn fullUrl must be urn:uuid:<lower-case UUID> or urn:oid:<OID>",
                expression=where,
            )
        return
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise WriteError(
            400, "invalid", "fullUrl must be an absolute URL or a urn:uuid", expression=where
        )
    if "/_history/" in parts.path:
        raise WriteError(
            400, "invalid", "fullUrl cannot be a version-specific URL (bdl-8)", expression=where
        )


def _check_full_url_agrees(full_url: str, resource: Resource, where: str) -> None:
    tail = urllib.parse.urlsplit(full_url).path.rstrip("/").split("/")[-2:]
    if tail != [resource.get("resourceType"), resource.get("id")]:
        raise WriteError(
            400,
            "invalid",
            "fullUrl disagrees with the resource's type and id",
            expression=where,
        )


def _check_unique_full_urls(ops: list[_Op]) -> None:
    seen: dict[str, int] = {}
    for op in ops:
        if op.full_url is None:
            continue
        if op.full_url in seen:
            raise WriteError(
                400,
                "invalid",
                f"entries {seen[op.full_url]} and {op.index} have the same fullUrl (bdl-7)",
                expression=op.at("fullUrl"),
            )
        seen[op.full_url] = op.index


# ---------------------------------------------------------------------------------------------
# content: local references, validation
# ---------------------------------------------------------------------------------------------
def _rewrite(value: Any, local: Mapping[str, str]) -> Any:
    """A copy of `value` with every string equal to a local fullUrl replaced by `Type/id`."""
    if isinstance(value, dict):
        return {
            k: (
                _DIV_LINK_RE.sub(lambda m: m[1] + local.get(m[2], m[2]) + m[3], v)
                if k == "div" and isinstance(v, str)
                else _rewrite(v, local)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, local) for v in value]
    if isinstance(value, str):
        return local.get(value, value)
    return value


def _check_local_refs(resource: Resource, where: str, *, in_transaction: bool) -> None:
    """A `reference` still naming a urn:uuid / urn:oid resolves to nothing: refuse it."""
    for path, ref in _references(resource, ""):
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            why = (
                "matches no fullUrl of this transaction"
                if in_transaction
                else "cannot be resolved (only transactions resolve references between entries)"
            )
            raise WriteError(
                400, "invalid", f"reference {path.lstrip('.')} {why}", expression=f"{where}{path}"
            )


def _references(value: Any, path: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                out.append((f"{path}.{k}", v))
            else:
                out.extend(_references(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for n, v in enumerate(value):
            out.extend(_references(v, f"{path}[{n}]"))
    return out


def _validate(resource: Resource, where: str) -> None:
    """422 unless the resource follows FHIR JSON rules and the R4B model (no content echoed)."""
    rtype = resource["resourceType"]
    problem = _json_problem(resource, "")
    if problem is not None:
        path, why = problem
        raise WriteError(422, "invalid", f"{rtype}{path}: {why}", expression=f"{where}{path}")
    try:
        model = get_fhir_model_class(rtype).model_validate(resource)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        msg = str(err.get("msg") or err.get("type"))
        given = err.get("input")
        if isinstance(given, str | int | float) and len(str(given)) > 2 and str(given) in msg:
            msg = str(err.get("type"))  # never echo resource content
        raise WriteError(
            422, "invalid", f"{rtype}{path}: {msg[:300]}", expression=f"{where}{path}"
        ) from None
    found = _code_problem(model, "")
    if found is not None:
        path, allowed = found
        raise WriteError(
            422,
            "code-invalid",
            f"{rtype}{path}: the code must be one of {', '.join(allowed)}",
            expression=f"{where}{path}",
        )


def _code_problem(model: pydantic.BaseModel, path: str) -> tuple[str, list[str]] | None:
    """The first `code` outside its required binding, where the model lists the whole value set.

    The R4B models keep each element's code list (`enum_values`, from the spec's short
    definition); a list ending in `+` is partial, so those elements are not checked.
    """
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        if value is None:
            continue
        key = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        codes = extra.get("enum_values")
        items = value if isinstance(value, list) else [value]
        for n, item in enumerate(items):
            at = f"{path}.{key}" + (f"[{n}]" if isinstance(value, list) else "")
            if isinstance(item, pydantic.BaseModel):
                found = _code_problem(item, at)
                if found is not None:
                    return found
            elif (
                isinstance(codes, list)
                and "+" not in codes
                and isinstance(item, str)
                and item not in codes
            ):
                return at, [str(c) for c in codes]
    return None


def _json_problem(value: Any, path: str) -> tuple[str, str] | None:
    """FHIR JSON rules (json.html) the models accept: no nulls, no empty objects or arrays."""
    if isinstance(value, dict):
        if not value:
            return path, "empty objects are not allowed"
        for key, item in value.items():
            if item is None:
                return f"{path}.{key}", "null is not allowed"
            if isinstance(item, list):
                if not item:
                    return f"{path}.{key}", "empty arrays are not allowed"
                twin = key[1:] if key.startswith("_") else f"_{key}"
                if any(x is None for x in item) and (
                    not isinstance(value.get(twin), list)
                    or len(value[twin]) != len(item)
                    or all(x is None for x in item)
                ):
                    return f"{path}.{key}", "null is only allowed to align primitive arrays"
            found = _json_problem(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found = _json_problem(item, f"{path}[{n}]")
            if found is not None:
                return found
    return None


def _info(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }

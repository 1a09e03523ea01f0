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
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from medblocks_sandbox.auth import require_token
from medblocks_sandbox.auth_model import TokenInfo
from medblocks_sandbox.fhir_match import parse_date_range
from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.fhir_store import FhirStore, format_instant
from medblocks_sandbox.fhir_write_checks import (
    _bundle_entries,
    _check_accept,
    _check_full_url,
    _check_full_url_agrees,
    _check_id,
    _check_keys,
    _check_local_refs,
    _check_query,
    _check_unique_full_urls,
    _if_match,
    _info,
    _outside,
    _prefer,
    _read_json,
    _response_entry,
    _rewrite,
    _validate,
    _write_op,
)
from medblocks_sandbox.fhir_write_ops import (
    _ENTRY_KEYS,
    _METHODS,
    _ORDER,
    _REQUEST_KEYS,
    _TYPE_RE,
    _WRITES,
    AllowedCheck,
    Forbid,
    WriteError,
    _Op,
    _Result,
    fhir_json,
    status_line,
)
from medblocks_sandbox.smart_scopes import AccessGrant


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

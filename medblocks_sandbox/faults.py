"""Fault injection for the sandbox servers: ASGI middleware, hooks and an admin API.

Tests turn faults on to check that our clients survive what real servers do. A fault is a
:class:`FaultRule`: a ``kind``, optional filters (``client_id``, a ``path`` regex, ``methods``), an
optional ``count`` (applied that many times, then gone) and kind-specific parameters. Rules live in
one :class:`FaultInjector` per server, driven from Python (``faults.add("error_burst", count=3)``)
or over HTTP through :func:`fault_admin_routes` (``POST /_sandbox/faults`` with the same fields as
JSON).

Kinds applied by :class:`FaultMiddleware` to any app (EHR, payer, bulk):

========================  ===================================================================
``latency``               sleep ``seconds`` before the request is handled
``rate_limit``            more than ``limit`` requests per ``window`` seconds per client: 429
                          with ``Retry-After`` as seconds or, with ``retry_after_form:
                          "http-date"``, an HTTP-date (RFC 9110 10.2.3)
``error_burst``           the next ``count`` requests answer ``status`` (default 503) with an
                          OperationOutcome, then the server recovers
``html_200``              the next ``count`` requests answer an HTML error page with status 200
``drop_connection``       the response body is cut after ``after_bytes`` bytes and the
                          connection closed
``expire_token``          a bearer token is refused (401 ``invalid_token``) after
                          ``after_requests`` requests (default 1) or ``after_seconds`` from its
                          first use; ``FaultInjector.on_token_expired`` lets the
                          authorization server expire it for real
``revoke_refresh``        ``grant_type=refresh_token`` at the token endpoint answers 400
                          ``invalid_grant``; ``FaultInjector.on_refresh_revoked`` lets the
                          authorization server revoke it
``huge_page``             a request's ``_count`` is raised to ``page_size``; servers should
                          also ask :meth:`FaultInjector.page_size` for their default page
``plain_text_401``        a request answers 401 with a ``text/plain`` body (no
                          OperationOutcome), as some gateways in front of FHIR servers do
========================  ===================================================================

Kinds consumed by the EHR's search (``ehr_api.py``), each a misbehaviour met on real servers:

============================  ===============================================================
``next_link_drops_params``    ``next``/``previous`` links keep only ``_count`` and ``_offset``,
                              and a search without a patient parameter answers from every
                              patient on the server, whatever the token's patient context
``foreign_entry_in_search``   a patient-scoped search page carries, as a ``match``, one
                              resource of the same type belonging to another patient
``no_category_search``        ``category`` is not declared in the CapabilityStatement and a
                              search using it answers 0 matches (``mode: "empty"``) or 400
                              (``mode: "400"``)
============================  ===============================================================

``error_burst``, ``html_200``, ``drop_connection`` and the bulk kinds below are one-shot: they
default to ``count=1`` so that a client that retries gets through.

Kinds consumed by the bulk server when an export runs (see ``bulk_export.py``): ``ndjson_truncate``
(line ``line`` cut in half), ``ndjson_malformed`` (line ``line`` replaced by broken JSON),
``count_mismatch`` (manifest counts off by ``delta``), ``export_fail`` (the job fails once
``at_fraction`` of its time has passed, status ``status``) and ``huge_page`` (one file per type).

Vendor quirks seen on third-party Bulk Data servers (issue 12), consumed by the bulk server too:

==============================  ===============================================================
``retry_after_epoch``           a 202 status answer gives ``Retry-After`` as an absolute epoch
                                time (seconds, or ``milliseconds: true``), not a delay
``export_expires``              once complete, the export expires after ``after_downloads`` file
                                downloads: its files answer ``410 Gone``, its status URL ``404``
``manifest_errors_partial``     the export completes (200) but the listed ``types`` failed: no
                                output for them, an ``error`` file naming each (severity error)
``paged_manifest``              with ``allowPartialManifests=true`` in the kick-off, the
                                manifest comes in pages of ``page_size`` files linked by
                                ``link`` relation ``next``
==============================  ===============================================================

Every request the middleware sees is counted per (method, path): :meth:`FaultInjector.requests`
(tests count token and discovery requests with it).

The client id comes from the bearer token through a resolver the app supplies (the EHR knows its
tokens); the default decodes a JWT access token's ``client_id``/``azp``/``sub`` without verifying
it, which is enough to pick a rule and never grants anything.
"""

import asyncio
import email.utils
import json
import math
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Default parameters per kind; a rule's params are checked against these names.
FAULT_DEFAULTS: dict[str, dict[str, Any]] = {
    "latency": {"seconds": 0.5},
    "rate_limit": {"limit": 5, "window": 1.0, "retry_after_form": "seconds"},
    "error_burst": {"status": 503},
    "html_200": {},
    "drop_connection": {"after_bytes": 64},
    "expire_token": {"after_requests": None, "after_seconds": None},
    "revoke_refresh": {},
    "huge_page": {"page_size": 10000},
    "plain_text_401": {},
    "next_link_drops_params": {},
    "foreign_entry_in_search": {},
    "no_category_search": {"mode": "empty"},
    "ndjson_truncate": {"line": 1},
    "ndjson_malformed": {"line": 1},
    "count_mismatch": {"delta": 1},
    "export_fail": {"at_fraction": 0.5, "status": 500},
    "retry_after_epoch": {"milliseconds": False},
    "export_expires": {"after_downloads": 0},
    "manifest_errors_partial": {"types": ["Observation"]},
    "paged_manifest": {"page_size": 2},
}

#: One-shot kinds: they default to ``count=1`` (one bad answer or one bad export), so a client
#: that retries gets through; give ``count`` for more, or ``count: null`` via Python for ever.
_COUNTED_BY_DEFAULT = {
    "error_burst",
    "html_200",
    "drop_connection",
    "ndjson_truncate",
    "ndjson_malformed",
    "count_mismatch",
    "export_fail",
    "export_expires",
    "manifest_errors_partial",
}

HTML_ERROR_PAGE = (
    "<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
    "<body><h1>We'll be back soon</h1><p>The system is undergoing maintenance.</p>"
    "</body></html>"
)


@dataclass
class FaultRule:
    """One fault: what, for whom, where, and how many more times."""

    kind: str
    client_id: str | None = None
    path: str | None = None
    methods: tuple[str, ...] | None = None
    count: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if self.kind not in FAULT_DEFAULTS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {sorted(FAULT_DEFAULTS)}")
        unknown = set(self.params) - set(FAULT_DEFAULTS[self.kind])
        if unknown:
            raise ValueError(f"fault {self.kind!r} has no parameters {sorted(unknown)}")
        self.params = {**FAULT_DEFAULTS[self.kind], **self.params}
        if self.count is None and self.kind in _COUNTED_BY_DEFAULT:
            self.count = 1
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if self.methods is not None:
            self.methods = tuple(m.upper() for m in self.methods)
        if self.path is not None:
            try:
                re.compile(self.path)
            except re.error as exc:
                raise ValueError(f"path is not a valid regex: {exc}") from None
        if self.kind == "no_category_search" and self.params["mode"] not in ("empty", "400"):
            raise ValueError("no_category_search mode must be 'empty' or '400'")
        form = self.params.get("retry_after_form")
        if form is not None and form not in ("seconds", "http-date"):
            raise ValueError("retry_after_form must be 'seconds' or 'http-date'")

    def matches(self, client_id: str | None, path: str, method: str) -> bool:
        """True if this rule applies to a request from ``client_id`` to ``method path``."""
        if self.client_id is not None and self.client_id != client_id:
            return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return self.path is None or re.search(self.path, path) is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the admin API returns it."""
        out = asdict(self)
        out["methods"] = list(self.methods) if self.methods else None
        return out


def rule_from_dict(data: dict[str, Any]) -> FaultRule:
    """Build a rule from the admin API's JSON: top-level filters, anything else is a param."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError("a fault is a JSON object with a 'kind'")
    data = dict(data)
    kind = data.pop("kind")
    filters = {k: data.pop(k) for k in ("client_id", "path", "count") if k in data}
    methods = data.pop("methods", None)
    params = data.pop("params", {}) or {}
    params.update(data)
    return FaultRule(
        kind=kind,
        methods=tuple(methods) if methods else None,
        params=params,
        **filters,
    )


class FaultInjector:
    """The fault rules of one server, thread-safe (the bulk worker threads read them too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._hits: dict[tuple[str, str], deque[float]] = {}
        #: Per rate_limit rule: accepted/refused counts, first/last accepted time, peak window,
        #: and the accepted times themselves (``times``) for a test to look at any span.
        self._rate_stats: dict[str, dict[str, Any]] = {}
        self._token_uses: dict[tuple[str, str], int] = {}
        self._token_seen: dict[tuple[str, str], float] = {}
        self._token_expired: set[tuple[str, str]] = set()
        self._requests: Counter[tuple[str, str]] = Counter()
        #: Seam for the authorization server: called with an access token the fault expired.
        self.on_token_expired: Callable[[str], None] | None = None
        #: Seam for the authorization server: called with a refresh token the fault revoked.
        self.on_refresh_revoked: Callable[[str], None] | None = None

    # -- rule management --------------------------------------------------------------------
    def add(
        self,
        kind: str,
        *,
        client_id: str | None = None,
        path: str | None = None,
        methods: tuple[str, ...] | list[str] | None = None,
        count: int | None = None,
        **params: Any,
    ) -> str:
        """Add a fault rule and return its id. Raises ``ValueError`` on an unknown kind/param."""
        rule = FaultRule(
            kind=kind,
            client_id=client_id,
            path=path,
            methods=tuple(methods) if methods else None,
            count=count,
            params=params,
        )
        return self.add_rule(rule)

    def add_rule(self, rule: FaultRule) -> str:
        """Add a prepared rule and return its id."""
        with self._lock:
            self._rules.append(rule)
        return rule.id

    def remove(self, rule_id: str) -> bool:
        """Remove one rule; False if there was none with that id."""
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        """Remove every rule and forget rate-limit windows and token counters."""
        with self._lock:
            self._rules.clear()
            self._hits.clear()
            self._rate_stats.clear()
            self._token_uses.clear()
            self._token_seen.clear()
            self._token_expired.clear()

    def rules(self) -> list[FaultRule]:
        """A snapshot of the active rules."""
        with self._lock:
            return list(self._rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def record(self, method: str, path: str) -> None:
        """Count one request (the middleware calls this for every request)."""
        with self._lock:
            self._requests[(method, path)] += 1

    def requests(self, path: str, method: str | None = None) -> int:
        """How many requests matched the ``path`` regex (and ``method``) so far."""
        pattern = re.compile(path)
        with self._lock:
            return sum(
                n
                for (m, p), n in self._requests.items()
                if pattern.search(p) and (method is None or m == method)
            )

    # -- lookups ----------------------------------------------------------------------------
    def _find(self, kind: str, client_id: str | None, path: str, method: str) -> FaultRule | None:
        for rule in self._rules:
            if rule.kind == kind and rule.matches(client_id, path, method):
                return rule
        return None

    def peek(
        self, kind: str, *, client_id: str | None, path: str = "", method: str = "GET"
    ) -> FaultRule | None:
        """The first matching rule of ``kind`` without using it up."""
        with self._lock:
            return self._find(kind, client_id, path, method)

    def take(
        self, kind: str, *, client_id: str | None, path: str = "", method: str = "GET"
    ) -> dict[str, Any] | None:
        """Use one application of the first matching rule of ``kind``; return its params."""
        with self._lock:
            rule = self._find(kind, client_id, path, method)
            if rule is None:
                return None
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self._rules.remove(rule)
            return dict(rule.params)

    def page_size(self, *, client_id: str | None, path: str = "") -> int | None:
        """Page size a ``huge_page`` fault imposes on this client, if any (for the EHR's search)."""
        rule = self.peek("huge_page", client_id=client_id, path=path)
        return int(rule.params["page_size"]) if rule else None

    def rate_limited(
        self, *, client_key: str, client_id: str | None, path: str, method: str
    ) -> tuple[float, str] | None:
        """Record a request; return ``(seconds_to_wait, form)`` when over a ``rate_limit`` rule."""
        now = time.monotonic()
        with self._lock:
            rule = self._find("rate_limit", client_id, path, method)
            if rule is None:
                return None
            limit = int(rule.params["limit"])
            window = float(rule.params["window"])
            hits = self._hits.setdefault((rule.id, client_key), deque())
            while hits and hits[0] <= now - window:
                hits.popleft()
            stats = self._rate_stats.setdefault(
                rule.id,
                {"accepted": 0, "refused": 0, "first": now, "last": now, "peak": 0, "times": []},
            )
            if len(hits) >= limit:
                # Rejected requests do not count, so a client that waits as told gets through.
                stats["refused"] += 1
                return max(hits[0] + window - now, 0.0), str(rule.params["retry_after_form"])
            hits.append(now)
            stats["accepted"] += 1
            stats["last"] = now
            stats["times"].append(now)
            stats["peak"] = max(stats["peak"], len(hits))
            return None

    def rate_stats(self, rule_id: str) -> dict[str, Any]:
        """What a ``rate_limit`` rule saw: ``accepted`` and ``refused`` (429) requests, the
        ``first``/``last`` accepted and every accepted ``times`` (monotonic seconds), and the
        ``peak`` count in one window."""
        with self._lock:
            stats = dict(self._rate_stats.get(rule_id) or {})
            stats["times"] = list(stats.get("times") or [])
            return stats

    def token_expired(self, *, token: str, client_id: str | None, path: str, method: str) -> bool:
        """Count one use of ``token``; True once an ``expire_token`` rule says it has expired."""
        now = time.monotonic()
        with self._lock:
            rule = self._find("expire_token", client_id, path, method)
            if rule is None:
                return False
            key = (rule.id, token)
            uses = self._token_uses.get(key, 0) + 1
            self._token_uses[key] = uses
            first_seen = self._token_seen.setdefault(key, now)
            after_requests = rule.params["after_requests"]
            after_seconds = rule.params["after_seconds"]
            if after_requests is None and after_seconds is None:
                after_requests = 1
            expired = (after_requests is not None and uses > int(after_requests)) or (
                after_seconds is not None and now - first_seen >= float(after_seconds)
            )
            # Tell the authorization server once per token.
            first_time = expired and key not in self._token_expired
            if first_time:
                self._token_expired.add(key)
        if first_time and self.on_token_expired:
            self.on_token_expired(token)
        return expired


def retry_after_value(seconds: float, form: str) -> str:
    """``Retry-After`` as delay-seconds or an IMF-fixdate HTTP-date (RFC 9110 10.2.3)."""
    whole = max(1, math.ceil(seconds))
    if form == "http-date":
        when = datetime.now(UTC) + timedelta(seconds=whole + 1)
        return email.utils.format_datetime(when, usegmt=True)
    return str(whole)


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """A one-issue OperationOutcome."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def outcome_response(
    status: int,
    code: str,
    diagnostics: str,
    headers: dict[str, str] | None = None,
    severity: str = "error",
) -> JSONResponse:
    """An OperationOutcome response with the FHIR JSON media type."""
    return JSONResponse(
        operation_outcome(code, diagnostics, severity),
        status_code=status,
        headers=headers,
        media_type="application/fhir+json",
    )


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The bearer token of an ASGI header list, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def jwt_client_resolver(token: str) -> str | None:
    """Default resolver: the ``client_id``/``azp``/``sub`` claim of a JWT access token.

    The signature is not checked: the answer only picks which fault rule applies.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    for claim in ("client_id", "azp", "sub"):
        value = claims.get(claim)
        if isinstance(value, str):
            return value
    return None


class _Abort(Exception):
    """Raised inside the wrapped ``send`` once a ``drop_connection`` fault has cut the body."""


class FaultMiddleware:
    """ASGI middleware applying a :class:`FaultInjector`'s request-level faults.

    ``client_resolver`` maps a bearer token to a client id (the EHR passes its token store's
    lookup). ``token_path`` is the regex of the token endpoint, where ``revoke_refresh`` acts.
    Paths under ``exempt_prefix`` (the admin API) are never faulted.
    """

    def __init__(
        self,
        app: ASGIApp,
        faults: FaultInjector,
        *,
        client_resolver: Callable[[str], str | None] = jwt_client_resolver,
        token_path: str = r"/token$",  # noqa: S107 (a URL path, not a secret)
        exempt_prefix: str = "/_sandbox",
    ) -> None:
        self.app = app
        self.faults = faults
        self.client_resolver = client_resolver
        self.token_path = re.compile(token_path)
        self.exempt_prefix = exempt_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(self.exempt_prefix):
            self.faults.record(scope["method"], scope["path"])
        if scope["type"] != "http" or not self.faults:
            await self.app(scope, receive, send)
            return
        # Under Starlette's Mount the path keeps the mount prefix (root_path is a prefix of it).
        path: str = scope["path"]
        if path.startswith(self.exempt_prefix):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        token = bearer_token(scope.get("headers", []))
        client_id = self.client_resolver(token) if token else None
        faults = self.faults
        where: dict[str, Any] = {"client_id": client_id, "path": path, "method": method}

        latency = faults.take("latency", **where)
        if latency is not None:
            await asyncio.sleep(float(latency["seconds"]))

        client = scope.get("client")
        client_key = client_id or (client[0] if client else "anonymous")
        limited = faults.rate_limited(client_key=client_key, **where)
        if limited:
            wait, form = limited
            response: Response = outcome_response(
                429,
                "throttled",
                "Too many requests",
                headers={"Retry-After": retry_after_value(wait, form)},
            )
            await response(scope, receive, send)
            return

        burst = faults.take("error_burst", **where)
        if burst is not None:
            status = int(burst["status"])
            code = "transient" if status in (502, 503, 504) else "exception"
            await outcome_response(status, code, "Injected server error")(scope, receive, send)
            return

        if faults.take("html_200", **where) is not None:
            await Response(HTML_ERROR_PAGE, status_code=200, media_type="text/html")(
                scope, receive, send
            )
            return

        if faults.take("plain_text_401", **where) is not None:
            await Response(
                "Unauthorized",
                status_code=401,
                media_type="text/plain",
                headers={"WWW-Authenticate": "Bearer"},
            )(scope, receive, send)
            return

        if token and faults.token_expired(token=token, **where):
            await outcome_response(
                401,
                "expired",
                "The access token has expired",
                headers={
                    "WWW-Authenticate": 'Bearer error="invalid_token", '
                    'error_description="The access token expired"'
                },
            )(scope, receive, send)
            return

        if method == "POST" and self.token_path.search(path):
            replayed = await self._maybe_revoke_refresh(scope, receive, send, where)
            if replayed is None:
                return
            receive = replayed

        huge = faults.peek("huge_page", **where)
        if huge is not None and b"_count=" in scope.get("query_string", b""):
            # Only a client-given _count is raised; without one the server's default applies
            # unless it asks FaultInjector.page_size() itself.
            scope = dict(scope)
            query = [
                (k, str(huge.params["page_size"]) if k == "_count" else v)
                for k, v in parse_qsl(scope["query_string"].decode(), keep_blank_values=True)
            ]
            scope["query_string"] = urlencode(query).encode()

        drop = faults.take("drop_connection", **where)
        if drop is not None:
            try:
                await self.app(scope, receive, _cutting_send(send, int(drop["after_bytes"])))
            except _Abort:
                # Returning without finishing the body makes the server close the socket.
                return
            return
        await self.app(scope, receive, send)

    async def _maybe_revoke_refresh(
        self, scope: Scope, receive: Receive, send: Send, where: dict[str, Any]
    ) -> Receive | None:
        """Read the token request; answer ``invalid_grant`` to a refresh the fault revokes."""
        # The client is known only from the form here, so look for a rule for any client first.
        if not any(r.kind == "revoke_refresh" for r in self.faults.rules()):
            return receive
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if form.get("grant_type") == "refresh_token":
            client_id = form.get("client_id") or where["client_id"]
            rule = self.faults.take(
                "revoke_refresh", client_id=client_id, path=where["path"], method="POST"
            )
            if rule is not None:
                refresh = form.get("refresh_token", "")
                if refresh and self.faults.on_refresh_revoked:
                    self.faults.on_refresh_revoked(refresh)
                await JSONResponse(
                    {"error": "invalid_grant", "error_description": "refresh token revoked"},
                    status_code=400,
                    headers={"Cache-Control": "no-store"},
                )(scope, receive, send)
                return None
        replayed = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def replay() -> Message:
            try:
                return next(replayed)
            except StopIteration:
                return await receive()

        return replay


def _cutting_send(send: Send, after_bytes: int) -> Send:
    """Wrap ``send`` so the body stops after ``after_bytes`` bytes and the app is aborted."""
    sent = 0

    async def wrapped(message: Message) -> None:
        nonlocal sent
        if message["type"] == "http.response.body":
            body: bytes = message.get("body", b"")
            if sent + len(body) >= after_bytes:
                part = body[: max(after_bytes - sent, 0)]
                if part:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
                sent = after_bytes
                raise _Abort
            sent += len(body)
        await send(message)

    return wrapped


def fault_admin_routes(
    faults: FaultInjector, *, prefix: str = "/_sandbox/faults", admin_token: str | None = None
) -> list[BaseRoute]:
    """Admin API: ``GET`` lists rules, ``POST`` adds one (or a list), ``DELETE`` clears all,
    ``DELETE {prefix}/{id}`` removes one. With ``admin_token`` set, calls need the
    ``X-Sandbox-Admin`` header to match it.
    """

    def _allowed(request: Request) -> bool:
        return admin_token is None or request.headers.get("x-sandbox-admin") == admin_token

    async def collection(request: Request) -> Response:
        if not _allowed(request):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        if request.method == "GET":
            return JSONResponse({"rules": [r.to_dict() for r in faults.rules()]})
        if request.method == "DELETE":
            faults.clear()
            return Response(status_code=204)
        try:
            payload = json.loads(await request.body())
            items = payload if isinstance(payload, list) else [payload]
            rules = [rule_from_dict(item) for item in items]
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": "invalid_fault", "detail": str(exc)}, status_code=400)
        ids = [faults.add_rule(rule) for rule in rules]
        return JSONResponse({"ids": ids}, status_code=201)

    async def item(request: Request) -> Response:
        if not _allowed(request):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        if faults.remove(request.path_params["rule_id"]):
            return Response(status_code=204)
        return JSONResponse({"error": "not_found"}, status_code=404)

    return [
        Route(prefix, collection, methods=["GET", "POST", "DELETE"], name="sandbox_faults"),
        Route(prefix + "/{rule_id}", item, methods=["DELETE"], name="sandbox_fault"),
    ]


def connect_auth_server(faults: FaultInjector, auth_server: Any) -> Callable[[str], str | None]:
    """Wire ``faults`` to the EHR's ``sandbox.auth.AuthServer`` and return a client resolver.

    ``expire_token`` then expires the token in the AS for real (``expire_access_token``) and
    ``revoke_refresh`` revokes the grant behind the refresh token (``revoke_refresh_token``).
    The resolver maps opaque access tokens to their client id (``client_of``) for
    :class:`FaultMiddleware`.
    """

    def resolve(token: str) -> str | None:
        client_of = getattr(auth_server, "client_of", None)
        if client_of is not None:
            found = client_of(token)
            if found:
                return str(found)
        info = auth_server.validate_access_token(token)
        return str(info.client_id) if info is not None else jwt_client_resolver(token)

    faults.on_token_expired = auth_server.expire_access_token
    faults.on_refresh_revoked = auth_server.revoke_refresh_token
    return resolve

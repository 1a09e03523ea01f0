"""Webhooks: the outbox ``events`` delivered to tenants' endpoints per Standard Webhooks.

Design (transactional outbox + cursor):

1. Every fact is written to ``events`` in the same transaction as the change (registry store).
2. :func:`fan_out` turns new events into one ``webhook_deliveries`` row per matching endpoint and
   marks the event in ``webhook_fanout`` in one transaction; the primary key on ``webhook_fanout``
   makes a second, concurrent fan-out of the same event fail instead of duplicating it.
3. :func:`deliver_due` claims due deliveries (a lease: ``next_attempt_at`` moves forward before the
   HTTP call), POSTs them, and records every attempt. A process that dies anywhere in between
   leaves either an un-fanned event or a pending delivery whose lease expires: nothing is lost,
   and the worst case is one extra delivery with the same ``webhook-id`` (at least once).

Why a low-water cursor *and* a fan-out table: on PostgreSQL, ids are handed out before commit, so
a transaction holding id 5 may commit after one holding id 6. The cursor only advances past events
older than :attr:`DeliveryPolicy.settle` and everything above it is checked against
``webhook_fanout``, so a late commit is still picked up.

Signing (https://www.standardwebhooks.com/): headers ``webhook-id``, ``webhook-timestamp`` (Unix
seconds of the attempt) and ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of
``id.timestamp.body``), computed by the ``standardwebhooks`` library. The body is
``{"type", "timestamp", "data"}``.
"""

import base64
import ipaddress
import json
import secrets as pysecrets
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.ops import tables as ot
from medblocks_pipelines.lib.ops.rows import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from medblocks_pipelines.lib.ops.webhook_pool import Post, PostResult, post_all, post_one
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.registry import schema as rt
from medblocks_pipelines.lib.registry.rows import Event, from_row
from medblocks_pipelines.lib.settings import Settings

# Growing delays over days, after the first attempt (the schedule Svix documents for the spec's
# reference implementation): the 8th attempt comes about 28 hours after the event.
DEFAULT_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)

# Every event type the platform emits (registry store + exports + this module).
EVENT_TYPES = (
    "connection.activated",
    "connection.failed",
    "connection.refresh_failed",
    "connection.revoked",
    "connection.expired",
    "sync.completed",
    "sync.failed",
    "export.completed",
    "export.failed",
    "network.query_refused",
    "webhook.endpoint_disabled",
)

SECRET_PREFIX = "webhook:"
_CURSOR = "fanout"


@dataclass(frozen=True)
class DeliveryPolicy:
    """How deliveries are retried and when an endpoint is given up on."""

    schedule: tuple[timedelta, ...] = DEFAULT_SCHEDULE
    # A claimed delivery whose worker died becomes due again after this lease.
    lease: timedelta = timedelta(minutes=2)
    # Events younger than this are re-checked for late commits before the cursor passes them.
    settle: timedelta = timedelta(minutes=10)
    # Disable an endpoint after this many consecutive failed attempts (across deliveries) ...
    max_consecutive_failures: int = 40
    # ... or once one delivery has exhausted its whole schedule.
    disable_on_exhausted: bool = True
    timeout_s: float = 15.0
    batch: int = 200
    # Parallel POSTs per round (1: one after another, on the caller's thread).
    workers: int = 1
    # Total seconds one deliver_due call may spend sending (None: no limit). A round starts only
    # if it can end in time even when every call times out; what is left stays due for later.
    deadline_s: float | None = None


@dataclass
class DeliveryReport:
    """What one :func:`deliver_due` call did (counts only)."""

    fanned_out_events: int = 0
    new_deliveries: int = 0
    attempted: int = 0
    succeeded: int = 0
    failed_attempts: int = 0
    exhausted: int = 0
    deferred: int = 0
    abandoned: int = 0
    disabled_endpoints: list[str] = field(default_factory=list)

    def as_metadata(self) -> dict[str, Any]:
        """A PHI-free dict for Dagster metadata and logs."""
        return {
            "fanned_out_events": self.fanned_out_events,
            "new_deliveries": self.new_deliveries,
            "attempted": self.attempted,
            "succeeded": self.succeeded,
            "failed_attempts": self.failed_attempts,
            "exhausted": self.exhausted,
            "deferred": self.deferred,
            "abandoned": self.abandoned,
            "disabled_endpoints": len(self.disabled_endpoints),
        }


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _now() -> datetime:
    return datetime.now(UTC)


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks form ``whsec_<base64 of 24 bytes>``."""
    return "whsec_" + base64.b64encode(pysecrets.token_bytes(24)).decode()


def matches(event_types: Iterable[str], event_type: str) -> bool:
    """Whether an endpoint filter accepts ``event_type`` (``*``, exact, or ``prefix.*``)."""
    for pattern in event_types:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


def _check_filter(event_types: Iterable[str]) -> list[str]:
    out = list(event_types) or ["*"]
    known_prefixes = {t.split(".")[0] for t in EVENT_TYPES}
    for pattern in out:
        ok = (
            pattern == "*"
            or pattern in EVENT_TYPES
            or (pattern.endswith(".*") and pattern[:-2] in known_prefixes)
        )
        if not ok:
            raise ConfigError(
                f"unknown event type {pattern!r}",
                hint="one of: * , " + ", ".join(EVENT_TYPES) + " or a prefix such as connection.*",
            )
    return out


def check_public_host(host: str) -> None:
    """Refuse receivers on loopback, private, link-local or reserved addresses (SSRF: a tenant
    must not make the platform call its own network or cloud metadata), unless
    ``MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE=1`` (the embedded default and tests on loopback)."""
    if Settings.from_env().webhook_allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConfigError(f"webhook host {host!r} does not resolve") from exc
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global or addr.is_multicast:
            raise ConfigError(
                f"webhook host {host!r} resolves to a non-public address",
                hint="set MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE=1 only on a trusted network",
            )


# -- endpoints -------------------------------------------------------------------------------
def add_endpoint(
    cp: ControlPlane,
    *,
    tenant_id: str,
    url: str,
    event_types: Iterable[str] = ("*",),
    description: str | None = None,
    secret: str | None = None,
    now: datetime | None = None,
) -> tuple[str, str]:
    """Register an endpoint; returns ``(endpoint_id, signing_secret)`` (show the secret once)."""
    cp.get_tenant(tenant_id)
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"webhook URL must be http(s) with a host, got scheme {parsed.scheme!r}")
    check_public_host(parsed.host)
    filters = _check_filter(event_types)
    secret = secret or new_secret()
    Webhook(secret)  # fails early on a secret the library cannot use
    endpoint_id = f"wh_{pysecrets.token_hex(8)}"
    at = now or _now()
    with cp.engine.begin() as conn:
        conn.execute(
            ot.webhook_endpoints.insert().values(
                id=endpoint_id,
                tenant_id=tenant_id,
                url=url,
                event_types=filters,
                description=description,
                status="enabled",
                consecutive_failures=0,
                created_at=at,
                updated_at=at,
            )
        )
    cp.vault.put(SECRET_PREFIX + endpoint_id, secret, tenant_id=tenant_id)
    return endpoint_id, secret


def get_endpoint(cp: ControlPlane, endpoint_id: str) -> WebhookEndpoint:
    """One endpoint row (no secret)."""
    with cp.engine.connect() as conn:
        row = conn.execute(
            sa.select(ot.webhook_endpoints).where(ot.webhook_endpoints.c.id == endpoint_id)
        ).first()
    if row is None:
        raise NotFound(
            f"webhook endpoint {endpoint_id!r} not found", hint="list them: medblocks webhooks list"
        )
    return from_row(WebhookEndpoint, row)


def list_endpoints(cp: ControlPlane, *, tenant_id: str | None = None) -> list[WebhookEndpoint]:
    """Endpoints, oldest first (no secrets)."""
    q = sa.select(ot.webhook_endpoints).order_by(
        ot.webhook_endpoints.c.created_at, ot.webhook_endpoints.c.id
    )
    if tenant_id is not None:
        q = q.where(ot.webhook_endpoints.c.tenant_id == tenant_id)
    with cp.engine.connect() as conn:
        return [from_row(WebhookEndpoint, r) for r in conn.execute(q)]


def set_endpoint_status(
    cp: ControlPlane,
    endpoint_id: str,
    status: str,
    *,
    reason: str | None = None,
    now: datetime | None = None,
) -> None:
    """Enable or disable an endpoint. Enabling makes its paused deliveries due at once."""
    if status not in ("enabled", "disabled"):
        raise ConfigError(f"unknown endpoint status {status!r}")
    endpoint = get_endpoint(cp, endpoint_id)
    at = now or _now()
    with cp.engine.begin() as conn:
        _set_status(conn, endpoint, status, reason=reason, at=at)
        if status == "enabled":
            conn.execute(
                ot.webhook_deliveries.update()
                .where(ot.webhook_deliveries.c.endpoint_id == endpoint_id)
                .where(ot.webhook_deliveries.c.status == "pending")
                .values(next_attempt_at=at)
            )


def _set_status(
    conn: sa.Connection,
    endpoint: WebhookEndpoint,
    status: str,
    *,
    reason: str | None,
    at: datetime,
) -> None:
    values: dict[str, Any] = {"status": status, "disabled_reason": reason, "updated_at": at}
    if status == "enabled":
        values.update(consecutive_failures=0, failing_since=None, disabled_reason=None)
    conn.execute(
        ot.webhook_endpoints.update()
        .where(ot.webhook_endpoints.c.id == endpoint.id)
        .values(**values)
    )
    if status == "disabled" and endpoint.status != "disabled":
        # The fact reaches the tenant's other endpoints (and operators) like any other event.
        conn.execute(
            rt.events.insert().values(
                tenant_id=endpoint.tenant_id,
                type="webhook.endpoint_disabled",
                payload={"endpoint_id": endpoint.id, "reason": reason},
                created_at=at,
            )
        )


def delete_endpoint_secret(cp: ControlPlane, endpoint_id: str) -> None:
    """Forget an endpoint's secret (after disabling it for good)."""
    cp.vault.delete(SECRET_PREFIX + endpoint_id)


# -- fan-out ---------------------------------------------------------------------------------
def _cursor(conn: sa.Connection) -> int:
    row = conn.execute(
        sa.select(ot.webhook_cursor.c.last_event_id).where(ot.webhook_cursor.c.name == _CURSOR)
    ).first()
    return int(row[0]) if row else 0


def fan_out(
    cp: ControlPlane, *, now: datetime, policy: DeliveryPolicy = DeliveryPolicy()
) -> tuple[int, int]:
    """Create deliveries for outbox events not yet fanned out; returns (events, deliveries)."""
    try:
        return _fan_out(cp, now=now, policy=policy)
    except sa.exc.IntegrityError:
        # Another worker fanned out the same events at the same moment (webhook_fanout's primary
        # key refused the second); its transaction made the deliveries, this one rolled back.
        return 0, 0


def _fan_out(cp: ControlPlane, *, now: datetime, policy: DeliveryPolicy) -> tuple[int, int]:
    events_done = deliveries = 0
    with cp.engine.begin() as conn:
        cursor = _cursor(conn)
        e = rt.events
        pending = conn.execute(
            sa.select(e)
            .where(e.c.id > cursor)
            .where(~sa.exists().where(ot.webhook_fanout.c.event_id == e.c.id))
            .order_by(e.c.id)
            .limit(policy.batch * 5)
        ).all()
        endpoints = conn.execute(
            sa.select(ot.webhook_endpoints).where(ot.webhook_endpoints.c.status == "enabled")
        ).all()
        for ev in pending:
            created = _aware(ev.created_at)
            n = 0
            for ep in endpoints:
                # An endpoint only hears about events that happened after it was registered.
                if ep.tenant_id != ev.tenant_id or (created and created < _aware(ep.created_at)):
                    continue
                if not matches(ep.event_types, ev.type):
                    continue
                conn.execute(
                    ot.webhook_deliveries.insert().values(
                        message_id=f"msg_{ev.id}_{ep.id}",
                        endpoint_id=ep.id,
                        event_id=ev.id,
                        tenant_id=ev.tenant_id,
                        event_type=ev.type,
                        status="pending",
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
                n += 1
            conn.execute(ot.webhook_fanout.insert().values(event_id=ev.id, deliveries=n, at=now))
            events_done += 1
            deliveries += n
        # Advance the low-water mark past events old enough that no earlier id can still commit.
        settled = conn.execute(
            sa.select(sa.func.max(e.c.id)).where(e.c.created_at < now - policy.settle)
        ).scalar()
        unfanned = conn.execute(
            sa.select(sa.func.min(e.c.id))
            .where(e.c.id > cursor)
            .where(~sa.exists().where(ot.webhook_fanout.c.event_id == e.c.id))
        ).scalar()
        new_cursor = cursor
        if settled is not None:
            new_cursor = max(cursor, int(settled))
            if unfanned is not None:
                new_cursor = min(new_cursor, int(unfanned) - 1)
            new_cursor = max(cursor, new_cursor)
        if (
            new_cursor != cursor
            or conn.execute(
                sa.select(ot.webhook_cursor.c.name).where(ot.webhook_cursor.c.name == _CURSOR)
            ).first()
            is None
        ):
            _save_cursor(conn, new_cursor, now)
    return events_done, deliveries


def _save_cursor(conn: sa.Connection, value: int, now: datetime) -> None:
    exists = conn.execute(
        sa.select(ot.webhook_cursor.c.name).where(ot.webhook_cursor.c.name == _CURSOR)
    ).first()
    if exists:
        conn.execute(
            ot.webhook_cursor.update()
            .where(ot.webhook_cursor.c.name == _CURSOR)
            .values(last_event_id=value, updated_at=now)
        )
    else:
        conn.execute(
            ot.webhook_cursor.insert().values(name=_CURSOR, last_event_id=value, updated_at=now)
        )


# -- delivery --------------------------------------------------------------------------------
def build_message(event: Event) -> bytes:
    """The JSON body of an event (``type``, ``timestamp``, ``data``), compact and stable."""
    created = _aware(event.created_at)
    body = {
        "type": event.type,
        "timestamp": created.isoformat().replace("+00:00", "Z") if created else None,
        "data": {"event_id": event.id, "tenant_id": event.tenant_id, **event.payload},
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def sign_headers(secret: str, message_id: str, body: bytes, *, at: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``, signed with the library."""
    sig = Webhook(secret).sign(message_id, at, body.decode())
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": sig,
        "content-type": "application/json",
    }


def next_delay(policy: DeliveryPolicy, attempts_made: int) -> timedelta | None:
    """Delay before the next attempt after ``attempts_made`` failures; None when exhausted."""
    if attempts_made - 1 < len(policy.schedule):
        return policy.schedule[attempts_made - 1]
    return None


def deliver_due(
    cp: ControlPlane,
    *,
    now: datetime,
    http: httpx.Client,
    policy: DeliveryPolicy = DeliveryPolicy(),
    wall_clock: Callable[[], datetime] = _now,
    clock: Callable[[], float] = time.monotonic,
) -> DeliveryReport:
    """Fan out new events, then attempt due deliveries once each; record every attempt.

    Rounds of ``policy.workers`` parallel POSTs, within ``policy.deadline_s``: deliveries not
    started in time are counted as ``deferred`` and stay due (untouched); a POST still running at
    the deadline is ``abandoned`` and due again once its lease expires. ``now`` drives the schedule
    (a fake clock in tests); the ``webhook-timestamp`` header is the wall-clock time of the HTTP
    request, because receivers reject stale timestamps (replay guard).
    """
    report = DeliveryReport()
    report.fanned_out_events, report.new_deliveries = fan_out(cp, now=now, policy=policy)
    d, ep_t = ot.webhook_deliveries, ot.webhook_endpoints
    with cp.engine.connect() as conn:
        due = conn.execute(
            sa.select(d, ep_t.c.url)
            .join(ep_t, ep_t.c.id == d.c.endpoint_id)
            .where(d.c.status == "pending")
            .where(ep_t.c.status == "enabled")
            .where(d.c.next_attempt_at <= now)
            .order_by(d.c.next_attempt_at, d.c.id)
            .limit(policy.batch)
        ).all()
    secrets: dict[str, str] = {}
    started = clock()
    workers = max(1, policy.workers)
    pool = (
        ThreadPoolExecutor(workers, thread_name_prefix="webhook") if workers > 1 and due else None
    )
    try:
        for i in range(0, len(due), workers):
            left = None if policy.deadline_s is None else policy.deadline_s - (clock() - started)
            if left is not None and left < policy.timeout_s:
                report.deferred += len(due) - i
                break
            prepared = [
                p
                for row in due[i : i + workers]
                if (p := _prepare(cp, row, now=now, policy=policy, secrets=secrets, at=wall_clock))
            ]
            results = post_all(
                http,
                [p[2] for p in prepared],
                pool=pool,
                timeout_s=policy.timeout_s,
                wait_s=policy.timeout_s if left is None else left,
            )
            for (row, endpoint, _), res in zip(prepared, results, strict=True):
                if res is None:
                    report.abandoned += 1
                    continue
                report.attempted += 1
                _record(cp, row, endpoint, res, now=now, policy=policy, report=report)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return report


def _prepare(
    cp: ControlPlane,
    row: Any,
    *,
    now: datetime,
    policy: DeliveryPolicy,
    secrets: dict[str, str],
    at: Callable[[], datetime],
) -> tuple[Any, WebhookEndpoint, Post] | None:
    """Claim ``row`` and build its signed request; None when another worker took it or its
    endpoint was disabled meanwhile."""
    if not _claim(cp, row, now=now, policy=policy):
        return None  # another worker took it
    endpoint = get_endpoint(cp, row.endpoint_id)
    if endpoint.status != "enabled":
        return None  # disabled by an earlier delivery in this batch
    if row.endpoint_id not in secrets:
        secret = cp.vault.get(SECRET_PREFIX + row.endpoint_id)
        if secret is None:
            raise ConfigError(f"webhook endpoint {row.endpoint_id} has no signing secret")
        secrets[row.endpoint_id] = secret.reveal()
    with cp.engine.connect() as conn:
        event = conn.execute(sa.select(rt.events).where(rt.events.c.id == row.event_id)).first()
    if event is None:
        raise NotFound(f"outbox event {row.event_id} is missing")
    body = build_message(from_row(Event, event))
    headers = sign_headers(secrets[row.endpoint_id], row.message_id, body, at=at())
    return row, endpoint, Post(row.url, body, headers)


def _claim(cp: ControlPlane, row: Any, *, now: datetime, policy: DeliveryPolicy) -> bool:
    d = ot.webhook_deliveries
    with cp.engine.begin() as conn:
        res = conn.execute(
            d.update()
            .where(d.c.id == row.id)
            .where(d.c.status == "pending")
            .where(d.c.next_attempt_at == row.next_attempt_at)
            .values(next_attempt_at=now + policy.lease)
        )
        return res.rowcount == 1


def _record(
    cp: ControlPlane,
    row: Any,
    endpoint: WebhookEndpoint,
    result: PostResult,
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: DeliveryReport,
) -> None:
    d, ep_t = ot.webhook_deliveries, ot.webhook_endpoints
    outcome, status_code, error = result.outcome, result.status_code, result.error
    attempt = int(row.attempts) + 1
    with cp.engine.begin() as conn:
        conn.execute(
            ot.webhook_attempts.insert().values(
                delivery_id=row.id,
                endpoint_id=row.endpoint_id,
                attempt=attempt,
                at=now,
                outcome=outcome,
                status_code=status_code,
                error=error,
                duration_ms=result.duration_ms,
            )
        )
        common = {
            "attempts": attempt,
            "last_attempt_at": now,
            "last_status_code": status_code,
            "last_error": error,
        }
        if outcome == "success":
            report.succeeded += 1
            conn.execute(
                d.update()
                .where(d.c.id == row.id)
                .values(status="succeeded", next_attempt_at=None, **common)
            )
            conn.execute(
                ep_t.update()
                .where(ep_t.c.id == row.endpoint_id)
                .values(consecutive_failures=0, failing_since=None)
            )
            return
        report.failed_attempts += 1
        delay = next_delay(policy, attempt)
        exhausted = delay is None
        conn.execute(
            d.update()
            .where(d.c.id == row.id)
            .values(
                status="failed" if exhausted else "pending",
                next_attempt_at=None if exhausted else now + delay,  # type: ignore[operator]
                **common,
            )
        )
        failures = (
            int(
                conn.execute(
                    sa.select(ep_t.c.consecutive_failures).where(ep_t.c.id == row.endpoint_id)
                ).scalar_one()
            )
            + 1
        )
        values: dict[str, Any] = {"consecutive_failures": failures}
        if failures == 1:
            values["failing_since"] = now
        conn.execute(ep_t.update().where(ep_t.c.id == row.endpoint_id).values(**values))
        if exhausted:
            report.exhausted += 1
        reason = None
        if exhausted and policy.disable_on_exhausted:
            reason = "a delivery failed on every attempt of the retry schedule"
        elif failures >= policy.max_consecutive_failures:
            reason = f"{failures} consecutive failed attempts"
        if reason:
            _set_status(conn, endpoint, "disabled", reason=reason, at=now)
            report.disabled_endpoints.append(row.endpoint_id)


# -- introspection ---------------------------------------------------------------------------
def list_deliveries(
    cp: ControlPlane, *, endpoint_id: str | None = None, status: str | None = None
) -> list[WebhookDelivery]:
    """Deliveries, oldest first."""
    d = ot.webhook_deliveries
    q = sa.select(d).order_by(d.c.id)
    if endpoint_id is not None:
        q = q.where(d.c.endpoint_id == endpoint_id)
    if status is not None:
        q = q.where(d.c.status == status)
    with cp.engine.connect() as conn:
        return [from_row(WebhookDelivery, r) for r in conn.execute(q)]


def list_attempts(cp: ControlPlane, *, endpoint_id: str | None = None) -> list[WebhookAttempt]:
    """Every attempt, oldest first."""
    a = ot.webhook_attempts
    q = sa.select(a).order_by(a.c.id)
    if endpoint_id is not None:
        q = q.where(a.c.endpoint_id == endpoint_id)
    with cp.engine.connect() as conn:
        return [from_row(WebhookAttempt, r) for r in conn.execute(q)]


def send_test(cp: ControlPlane, endpoint_id: str, *, http: httpx.Client) -> tuple[int | None, str]:
    """POST a signed ``webhook.test`` message now (not retried, not an outbox event)."""
    endpoint = get_endpoint(cp, endpoint_id)
    secret = cp.vault.get(SECRET_PREFIX + endpoint_id)
    if secret is None:
        raise ConfigError(f"webhook endpoint {endpoint_id} has no signing secret")
    at = _now()
    body = json.dumps(
        {
            "type": "webhook.test",
            "timestamp": at.isoformat().replace("+00:00", "Z"),
            "data": {"endpoint_id": endpoint_id, "tenant_id": endpoint.tenant_id},
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    headers = sign_headers(secret.reveal(), f"msg_test_{pysecrets.token_hex(8)}", body, at=at)
    res = post_one(http, Post(endpoint.url, body, headers), 15.0)
    return res.status_code, res.error or res.outcome

"""The control plane: registry, connection lifecycle, pull history, audit, watermarks, outbox.

One code path over SQLite and PostgreSQL (SQLAlchemy Core). Every state change of a connection writes the
new state, a ``connection_events`` row and an outbox ``events`` row in the same transaction.
"""

import dataclasses
import secrets as pysecrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from medblocks_pipelines.lib.errors import InvalidTransition, NotFound, RegistryError
from medblocks_pipelines.lib.partitions import normalise_id
from medblocks_pipelines.lib.registry import schema as t
from medblocks_pipelines.lib.registry.db import make_engine, migrate
from medblocks_pipelines.lib.registry.rows import (
    AuditEntry,
    BulkExport,
    Connection,
    ConnectionEvent,
    Event,
    Organization,
    Pull,
    Source,
    Tenant,
    from_row,
)
from medblocks_pipelines.lib.registry.vault import Vault, load_keys
from medblocks_pipelines.lib.settings import Settings

PATTERNS = ("patient_access", "clinician_workflow", "backend", "network")
SOURCE_KINDS = ("ehr", "payer", "network")

R = TypeVar("R")

# The connection lifecycle (ARCHITECTURE.md): pending -> active -> (refresh_failed | revoked | expired),
# or failed. An active connection whose refresh failed can become active again after re-consent, and a
# connection in any live state can be revoked.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"active", "failed", "revoked"}),
    "active": frozenset({"refresh_failed", "revoked", "expired"}),
    "refresh_failed": frozenset({"active", "revoked", "expired"}),
    "expired": frozenset({"active", "revoked"}),
    "failed": frozenset(),
    "revoked": frozenset(),
}

# Outbox event types for state changes an integrating app cares about.
_STATE_EVENTS = {
    "active": "connection.activated",
    "failed": "connection.failed",
    "refresh_failed": "connection.refresh_failed",
    "revoked": "connection.revoked",
    "expired": "connection.expired",
}


def check_id(value: str, what: str) -> str:
    """Registry ids are already normalised (``[a-z0-9-]``) so partition keys map back to them."""
    if not value or normalise_id(value) != value:
        raise RegistryError(
            f"{what} id {value!r} is not normalised",
            hint=f"use lower-case letters, digits and '-', e.g. {normalise_id(value or 'x')!r}",
        )
    return value


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _row(cls: Callable[..., R], row: sa.Row[Any] | None) -> R | None:
    return None if row is None else from_row(cls, row)


def _rows(cls: Callable[..., R], rows: Iterable[sa.Row[Any]]) -> list[R]:
    return [from_row(cls, r) for r in rows]


def _outbox(
    conn: sa.Connection, tenant_id: str, type: str, payload: Mapping[str, Any], at: datetime
) -> int:
    """Append an outbox event inside the caller's transaction (it commits with the change)."""
    res = conn.execute(
        t.events.insert().values(
            tenant_id=tenant_id, type=type, payload=dict(payload), created_at=at
        )
    )
    return int(res.inserted_primary_key[0])  # type: ignore[index]


# The command that lists each kind of registry row (foundation/test_cli_hints.py checks them).
_LIST_HINTS = {
    "tenants": "list them: medblocks tenants list",
    "sources": "list them: medblocks sources list",
    "organizations": "list them: medblocks orgs list --tenant TENANT",
    "connections": "list them: medblocks connections list --tenant TENANT",
    "bulk_exports": "an organization's exports: medblocks bulk status --tenant TENANT --org ORG",
}


class ControlPlane:
    """Typed facade over the control-plane tables."""

    def __init__(self, engine: sa.Engine, vault: Vault) -> None:
        self.engine = engine
        self.vault = vault

    def __repr__(self) -> str:
        return f"ControlPlane(dialect={self.engine.dialect.name})"

    # -- tenants -------------------------------------------------------------------------------
    def add_tenant(self, id: str, name: str, settings: Mapping[str, Any] | None = None) -> None:
        """Create or update a tenant (idempotent: registry-as-code re-applies the same YAML)."""
        check_id(id, "tenant")
        self._upsert(t.tenants, {"id": id}, {"name": name, "settings": dict(settings or {})})

    def get_tenant(self, id: str) -> Tenant:
        return self._get(Tenant, t.tenants, id, "tenant")

    def list_tenants(self) -> list[Tenant]:
        return self._list(Tenant, t.tenants, order_by=t.tenants.c.id)

    # -- sources -------------------------------------------------------------------------------
    def add_source(
        self,
        id: str,
        name: str,
        vendor: str,
        kind: str,
        fhir_base_url: str | None,
        patterns: Iterable[str],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Create or update a source catalog entry."""
        check_id(id, "source")
        pats = list(patterns)
        if kind not in SOURCE_KINDS:
            raise RegistryError(f"unknown source kind {kind!r}", hint=f"one of {SOURCE_KINDS}")
        unknown = [p for p in pats if p not in PATTERNS]
        if unknown:
            raise RegistryError(f"unknown patterns {unknown}", hint=f"one of {PATTERNS}")
        self._upsert(
            t.sources,
            {"id": id},
            {
                "name": name,
                "vendor": vendor,
                "kind": kind,
                "fhir_base_url": fhir_base_url,
                "patterns": pats,
                "config": dict(config or {}),
            },
        )

    def get_source(self, id: str) -> Source:
        return self._get(Source, t.sources, id, "source")

    def list_sources(self) -> list[Source]:
        return self._list(Source, t.sources, order_by=t.sources.c.id)

    def update_source(self, id: str, **fields: Any) -> None:
        self._update(t.sources, id, fields, "source")

    def update_source_discovery(
        self,
        id: str,
        *,
        smart_config: Mapping[str, Any] | None = None,
        capability_statement: Mapping[str, Any] | None = None,
    ) -> None:
        """Record what discovery found at the source."""
        fields: dict[str, Any] = {"discovered_at": utcnow()}
        if smart_config is not None:
            fields["smart_config"] = dict(smart_config)
        if capability_statement is not None:
            fields["capability_statement"] = dict(capability_statement)
        self._update(t.sources, id, fields, "source")

    # -- organizations -------------------------------------------------------------------------
    def add_organization(
        self,
        id: str,
        tenant_id: str,
        source_id: str,
        name: str,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Create or update an organization that authorized ``tenant_id`` at ``source_id``."""
        check_id(id, "organization")
        self.get_tenant(tenant_id)
        self.get_source(source_id)
        existing = self._maybe(Organization, t.organizations, id)
        if existing and existing.tenant_id != tenant_id:
            raise RegistryError(
                f"organization {id!r} belongs to another tenant",
                hint="organization ids are global; pick another id",
            )
        self._upsert(
            t.organizations,
            {"id": id},
            {
                "tenant_id": tenant_id,
                "source_id": source_id,
                "name": name,
                "config": dict(config or {}),
            },
        )

    def get_organization(self, id: str) -> Organization:
        return self._get(Organization, t.organizations, id, "organization")

    def list_organizations(self, tenant_id: str | None = None) -> list[Organization]:
        q = sa.select(t.organizations).order_by(t.organizations.c.id)
        if tenant_id is not None:
            q = q.where(t.organizations.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return _rows(Organization, conn.execute(q))

    def update_organization(self, id: str, **fields: Any) -> None:
        self._update(t.organizations, id, fields, "organization")

    # -- connections ---------------------------------------------------------------------------
    def create_connection(
        self,
        *,
        tenant_id: str,
        pattern: str,
        source_id: str,
        organization_id: str | None = None,
        patient_ref: str | None = None,
        context: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> str:
        """Create a ``pending`` connection and its first event; returns its id."""
        if pattern not in PATTERNS:
            raise RegistryError(f"unknown pattern {pattern!r}", hint=f"one of {PATTERNS}")
        self.get_tenant(tenant_id)
        self.get_source(source_id)
        conn_id = id or f"conn_{pysecrets.token_hex(8)}"
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                t.connections.insert().values(
                    id=conn_id,
                    tenant_id=tenant_id,
                    pattern=pattern,
                    source_id=source_id,
                    organization_id=organization_id,
                    patient_ref=patient_ref,
                    state="pending",
                    context=dict(context or {}),
                    has_refresh_token=False,
                    created_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                t.connection_events.insert().values(
                    connection_id=conn_id,
                    at=now,
                    event_type="created",
                    from_state=None,
                    to_state="pending",
                    detail={"pattern": pattern, "source": source_id},
                )
            )
        return conn_id

    def get_connection(self, id: str) -> Connection:
        return self._get(Connection, t.connections, id, "connection")

    def list_connections(
        self,
        *,
        tenant_id: str | None = None,
        pattern: str | None = None,
        state: str | None = None,
        source_id: str | None = None,
        organization_id: str | None = None,
    ) -> list[Connection]:
        q = sa.select(t.connections).order_by(t.connections.c.created_at, t.connections.c.id)
        for col, val in (
            ("tenant_id", tenant_id),
            ("pattern", pattern),
            ("state", state),
            ("source_id", source_id),
            ("organization_id", organization_id),
        ):
            if val is not None:
                q = q.where(t.connections.c[col] == val)
        with self.engine.connect() as conn:
            return _rows(Connection, conn.execute(q))

    def update_connection(self, id: str, **fields: Any) -> None:
        """Update non-state fields of a connection (state changes go through :meth:`transition`)."""
        if "state" in fields:
            raise RegistryError("use transition() to change a connection's state")
        fields["updated_at"] = utcnow()
        self._update(t.connections, id, fields, "connection")

    def transition(
        self,
        connection_id: str,
        to_state: str,
        *,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
        event_type: str | None = None,
    ) -> Connection:
        """Move a connection to ``to_state`` if the lifecycle allows it; records event + outbox row."""
        now = utcnow()
        with self.engine.begin() as conn:
            stmt = sa.select(t.connections).where(t.connections.c.id == connection_id)
            if conn.dialect.name == "postgresql":
                stmt = stmt.with_for_update()
            row = _row(Connection, conn.execute(stmt).first())
            if row is None:
                raise NotFound(f"connection {connection_id!r} not found")
            from_state = row.state
            if to_state not in TRANSITIONS.get(from_state, frozenset()):
                raise InvalidTransition(
                    f"connection {connection_id} cannot go from {from_state} to {to_state}"
                )
            conn.execute(
                t.connections.update()
                .where(t.connections.c.id == connection_id)
                .values(state=to_state, state_reason=reason, updated_at=now)
            )
            conn.execute(
                t.connection_events.insert().values(
                    connection_id=connection_id,
                    at=now,
                    event_type=event_type or f"state.{to_state}",
                    from_state=from_state,
                    to_state=to_state,
                    detail={**dict(detail or {}), **({"reason": reason} if reason else {})},
                )
            )
            if to_state in _STATE_EVENTS:
                _outbox(
                    conn,
                    row.tenant_id,
                    _STATE_EVENTS[to_state],
                    {
                        "connection_id": connection_id,
                        "pattern": row.pattern,
                        "source_id": row.source_id,
                        "organization_id": row.organization_id,
                        "from_state": from_state,
                        "to_state": to_state,
                        "reason": reason,
                    },
                    now,
                )
        return dataclasses.replace(row, state=to_state, state_reason=reason, updated_at=now)

    def record_event(
        self, connection_id: str, event_type: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Record a non-state event (token refreshed, pull started, launch...)."""
        with self.engine.begin() as conn:
            conn.execute(
                t.connection_events.insert().values(
                    connection_id=connection_id,
                    at=utcnow(),
                    event_type=event_type,
                    detail=dict(detail or {}),
                )
            )

    def connection_events(self, connection_id: str) -> list[ConnectionEvent]:
        q = (
            sa.select(t.connection_events)
            .where(t.connection_events.c.connection_id == connection_id)
            .order_by(t.connection_events.c.id)
        )
        with self.engine.connect() as conn:
            return _rows(ConnectionEvent, conn.execute(q))

    # -- pulls ---------------------------------------------------------------------------------
    def start_pull(
        self,
        *,
        tenant_id: str,
        pattern: str,
        source_id: str,
        organization_id: str | None = None,
        connection_id: str | None = None,
        run_id: str | None = None,
    ) -> int:
        """Open a pull-history row; returns its id."""
        with self.engine.begin() as conn:
            res = conn.execute(
                t.pull_history.insert().values(
                    tenant_id=tenant_id,
                    pattern=pattern,
                    source_id=source_id,
                    organization_id=organization_id,
                    connection_id=connection_id,
                    run_id=run_id,
                    started_at=utcnow(),
                    status="running",
                    counts={},
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

    def finish_pull(
        self, pull_id: int, *, status: str, counts: Mapping[str, int], error: str | None = None
    ) -> None:
        """Close a pull-history row and emit a sync outbox event."""
        if status not in ("success", "partial", "failed"):
            raise RegistryError(f"unknown pull status {status!r}")
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                t.pull_history.update()
                .where(t.pull_history.c.id == pull_id)
                .values(finished_at=now, status=status, counts=dict(counts), error=error)
            )
            row = _row(
                Pull,
                conn.execute(
                    sa.select(t.pull_history).where(t.pull_history.c.id == pull_id)
                ).first(),
            )
            if row is None:
                raise NotFound(f"pull {pull_id} not found")
            _outbox(
                conn,
                row.tenant_id,
                "sync.failed" if status == "failed" else "sync.completed",
                {
                    "pull_id": pull_id,
                    "pattern": row.pattern,
                    "source_id": row.source_id,
                    "organization_id": row.organization_id,
                    "connection_id": row.connection_id,
                    "status": status,
                    "counts": dict(counts),
                },
                now,
            )

    def running_pulls(self) -> list[Pull]:
        """Every pull-history row still ``running`` (crash recovery checks their runs)."""
        q = sa.select(t.pull_history).where(t.pull_history.c.status == "running")
        with self.engine.connect() as conn:
            return _rows(Pull, conn.execute(q.order_by(t.pull_history.c.id)))

    def list_pulls(self, *, tenant_id: str | None = None, limit: int = 100) -> list[Pull]:
        q = sa.select(t.pull_history).order_by(t.pull_history.c.id.desc()).limit(limit)
        if tenant_id is not None:
            q = q.where(t.pull_history.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return _rows(Pull, conn.execute(q))

    # -- audit ---------------------------------------------------------------------------------
    def audit(
        self,
        *,
        tenant_id: str,
        actor: str,
        action: str,
        decision: str,
        person_id: str | None = None,
        purpose: str | None = None,
        reason: str | None = None,
        evidence: Mapping[str, Any] | None = None,
        gateways: list[Any] | None = None,
        responders: list[Any] | None = None,
        documents: list[Any] | None = None,
    ) -> int:
        """Append an audit-log row (append-only); a refusal also emits an outbox event."""
        if decision not in ("allowed", "refused"):
            raise RegistryError(f"unknown audit decision {decision!r}")
        now = utcnow()
        with self.engine.begin() as conn:
            res = conn.execute(
                t.audit_log.insert().values(
                    at=now,
                    tenant_id=tenant_id,
                    actor=actor,
                    action=action,
                    person_id=person_id,
                    purpose=purpose,
                    decision=decision,
                    reason=reason,
                    evidence=dict(evidence or {}),
                    gateways=list(gateways or []),
                    responders=list(responders or []),
                    documents=list(documents or []),
                )
            )
            audit_id = int(res.inserted_primary_key[0])  # type: ignore[index]
            if decision == "refused":
                _outbox(
                    conn,
                    tenant_id,
                    "network.query_refused",
                    {"audit_id": audit_id, "purpose": purpose, "reason": reason},
                    now,
                )
        return audit_id

    def update_audit(self, audit_id: int, **fields: Any) -> None:
        """Fill in results (responders, documents) of an allowed query after it ran."""
        with self.engine.begin() as conn:
            conn.execute(t.audit_log.update().where(t.audit_log.c.id == audit_id).values(**fields))

    def list_audit(self, *, tenant_id: str | None = None, limit: int = 100) -> list[AuditEntry]:
        q = sa.select(t.audit_log).order_by(t.audit_log.c.id.desc()).limit(limit)
        if tenant_id is not None:
            q = q.where(t.audit_log.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return _rows(AuditEntry, conn.execute(q))

    # -- watermarks ----------------------------------------------------------------------------
    def get_watermark(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.watermarks.c.value).where(t.watermarks.c.key == key)
            ).first()
        return row.value if row else None

    def list_watermarks(self, prefix: str) -> dict[str, str | None]:
        """Every watermark whose key starts with ``prefix`` (key -> value)."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.watermarks.c.key, t.watermarks.c.value).where(
                    t.watermarks.c.key.like(pattern, escape="\\")
                )
            ).all()
        return {r.key: r.value for r in rows}

    def delete_watermark(self, key: str) -> None:
        """Remove a watermark row (a cleared hold, unlike ``set_watermark(key, None)``)."""
        with self.engine.begin() as conn:
            conn.execute(t.watermarks.delete().where(t.watermarks.c.key == key))

    def set_watermark(self, key: str, value: str | None) -> None:
        """Set (or with ``None`` clear) an incremental cursor such as a bulk ``_since``."""
        self._upsert(t.watermarks, {"key": key}, {"value": value}, timestamp="updated_at")

    # -- bulk exports --------------------------------------------------------------------------
    def save_bulk_export(
        self,
        *,
        tenant_id: str,
        source_id: str,
        polling_url: str,
        request: Mapping[str, Any],
        organization_id: str | None = None,
        connection_id: str | None = None,
        since: str | None = None,
        run_id: str | None = None,
        id: str | None = None,
    ) -> str:
        """Save a kicked-off export at once, so a crash never loses its polling URL."""
        return self._insert_bulk_export(
            id or f"exp_{pysecrets.token_hex(8)}",
            status="kicked_off",
            polling_url=polling_url,
            poll_now=True,
            tenant_id=tenant_id,
            source_id=source_id,
            organization_id=organization_id,
            connection_id=connection_id,
            request=request,
            since=since,
            run_id=run_id,
        )

    def reserve_bulk_export(
        self,
        *,
        tenant_id: str,
        source_id: str,
        organization_id: str,
        request: Mapping[str, Any],
        connection_id: str | None = None,
        since: str | None = None,
        run_id: str | None = None,
    ) -> str | None:
        """Claim the organization's one in-flight slot before the kick-off request is sent.

        Inserts a ``starting`` row; the partial unique index ``uq_bulk_exports_in_flight`` makes
        this atomic, so of two concurrent callers one gets the id and the other ``None`` (it then
        reuses the winner's export). :meth:`start_bulk_export` fills in the polling URL.
        """
        try:
            return self._insert_bulk_export(
                f"exp_{pysecrets.token_hex(8)}",
                status="starting",
                polling_url=None,
                poll_now=False,
                tenant_id=tenant_id,
                source_id=source_id,
                organization_id=organization_id,
                connection_id=connection_id,
                request=request,
                since=since,
                run_id=run_id,
            )
        except sa.exc.IntegrityError:
            return None

    def _insert_bulk_export(
        self,
        export_id: str,
        *,
        status: str,
        polling_url: str | None,
        poll_now: bool,
        request: Mapping[str, Any],
        **columns: str | None,
    ) -> str:
        """One new ``bulk_exports`` row (a kicked-off export, or a reserved in-flight slot)."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                t.bulk_exports.insert().values(
                    id=export_id,
                    polling_url=polling_url,
                    status=status,
                    request=dict(request),
                    counts={},
                    kicked_off_at=now,
                    next_poll_at=now if poll_now else None,
                    updated_at=now,
                    **columns,
                )
            )
        return export_id

    def start_bulk_export(self, id: str, *, polling_url: str) -> None:
        """Record the polling URL of a reserved export (it is now ``kicked_off``)."""
        now = utcnow()
        self.update_bulk_export(id, status="kicked_off", polling_url=polling_url, next_poll_at=now)

    def delete_bulk_export(self, id: str) -> None:
        """Remove a reserved export whose kick-off was refused (nothing exists on the server)."""
        with self.engine.begin() as conn:
            conn.execute(t.bulk_exports.delete().where(t.bulk_exports.c.id == id))

    def get_bulk_export(self, id: str) -> BulkExport:
        return self._get(BulkExport, t.bulk_exports, id, "bulk export")

    def update_bulk_export(self, id: str, **fields: Any) -> None:
        fields["updated_at"] = utcnow()
        self._update(t.bulk_exports, id, fields, "bulk export")

    def list_bulk_exports(
        self,
        *,
        status: str | Iterable[str] | None = None,
        tenant_id: str | None = None,
        organization_id: str | None = None,
    ) -> list[BulkExport]:
        q = sa.select(t.bulk_exports).order_by(t.bulk_exports.c.kicked_off_at)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            q = q.where(t.bulk_exports.c.status.in_(statuses))
        if tenant_id is not None:
            q = q.where(t.bulk_exports.c.tenant_id == tenant_id)
        if organization_id is not None:
            q = q.where(t.bulk_exports.c.organization_id == organization_id)
        with self.engine.connect() as conn:
            return _rows(BulkExport, conn.execute(q))

    # -- outbox --------------------------------------------------------------------------------
    def emit_event(self, tenant_id: str, type: str, payload: Mapping[str, Any]) -> int:
        """Append an outbox event (for facts not already emitted by a state change)."""
        with self.engine.begin() as conn:
            return _outbox(conn, tenant_id, type, payload, utcnow())

    def list_events(
        self, *, tenant_id: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]:
        q = sa.select(t.events).where(t.events.c.id > after_id).order_by(t.events.c.id).limit(limit)
        if tenant_id is not None:
            q = q.where(t.events.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return _rows(Event, conn.execute(q))

    # -- helpers -------------------------------------------------------------------------------
    def _maybe(self, cls: Callable[..., R], table: sa.Table, id: str) -> R | None:
        with self.engine.connect() as conn:
            return _row(cls, conn.execute(sa.select(table).where(table.c.id == id)).first())

    def _get(self, cls: Callable[..., R], table: sa.Table, id: str, what: str) -> R:
        row = self._maybe(cls, table, id)
        if row is None:
            raise NotFound(f"{what} {id!r} not found", hint=_LIST_HINTS.get(table.name))
        return row

    def _list(self, cls: Callable[..., R], table: sa.Table, *, order_by: Any) -> list[R]:
        with self.engine.connect() as conn:
            return _rows(cls, conn.execute(sa.select(table).order_by(order_by)))

    def _update(self, table: sa.Table, id: str, fields: Mapping[str, Any], what: str) -> None:
        with self.engine.begin() as conn:
            res = conn.execute(table.update().where(table.c.id == id).values(**fields))
            if res.rowcount == 0:
                raise NotFound(f"{what} {id!r} not found")

    def _upsert(
        self,
        table: sa.Table,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        timestamp: str = "created_at",
    ) -> None:
        cond = sa.and_(*(table.c[k] == v for k, v in key.items()))
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(sa.literal(1)).select_from(table).where(cond)).first()
            if exists:
                upd = dict(values)
                if timestamp == "updated_at":
                    upd["updated_at"] = utcnow()
                conn.execute(table.update().where(cond).values(**upd))
            else:
                conn.execute(table.insert().values(**key, **values, **{timestamp: utcnow()}))


def open_control_plane(settings: Settings, *, migrate_schema: bool = True) -> ControlPlane:
    """Open (and by default migrate) the control plane described by ``settings``."""
    engine = make_engine(settings.database_url)
    if migrate_schema:
        migrate(engine)
    return ControlPlane(engine, Vault(engine, load_keys(settings.data_dir)))

"""The control plane: registry, connection lifecycle, pull history, audit, watermarks, outbox.

One code path over SQLite and PostgreSQL (SQLAlchemy Core). Every state change of a connection writes the
new state, a ``connection_events`` row and an outbox ``events`` row in the same transaction.

:class:`ControlPlane` is the public class and this module its import point. The registry and the
connection lifecycle live here; its other parts are ``store_history`` (pulls, audit, watermarks,
outbox), ``store_bulk`` (bulk exports) and ``store_base`` (engine, typed row reads, helpers).
Every read returns a typed row (:mod:`~medblocks_pipelines.lib.registry.rows`).
"""

import dataclasses
import secrets as pysecrets
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.errors import InvalidTransition, NotFound, RegistryError
from medblocks_pipelines.lib.registry import schema as t
from medblocks_pipelines.lib.registry.db import ensure_schema, make_engine
from medblocks_pipelines.lib.registry.rows import (
    Connection,
    ConnectionEvent,
    Organization,
    Source,
    Tenant,
)
from medblocks_pipelines.lib.registry.store_base import _outbox, _row, _rows, check_id, utcnow
from medblocks_pipelines.lib.registry.store_bulk import BulkExportStore
from medblocks_pipelines.lib.registry.store_history import HistoryStore
from medblocks_pipelines.lib.registry.vault import Vault, load_keys
from medblocks_pipelines.lib.settings import Settings

__all__ = [
    "PATTERNS",
    "SOURCE_KINDS",
    "TRANSITIONS",
    "ControlPlane",
    "check_id",
    "open_control_plane",
    "utcnow",
]

PATTERNS = ("patient_access", "clinician_workflow", "backend", "network")
SOURCE_KINDS = ("ehr", "payer", "network")


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


class ControlPlane(HistoryStore, BulkExportStore):
    """Typed facade over the control-plane tables: the registry and connection lifecycle here,
    history (pulls, audit, watermarks, outbox) and bulk exports in their own modules."""

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


def open_control_plane(settings: Settings, *, check_schema: bool = True) -> ControlPlane:
    """Open the control plane described by ``settings`` on the process's engine for its URL.

    The schema must be at head (``medblocks db upgrade``): a database behind raises a one-line
    :class:`ConfigError`; a brand-new embedded SQLite file is created at head (``db.ensure_schema``).
    """
    engine = make_engine(settings.database_url)
    if check_schema:
        ensure_schema(engine)
    return ControlPlane(engine, Vault(engine, load_keys(settings.data_dir, settings.secret_key)))

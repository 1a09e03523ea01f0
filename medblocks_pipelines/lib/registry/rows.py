"""Typed rows of the control-plane tables in :mod:`~medblocks_pipelines.lib.registry.schema`.

The stores used to hand back ``dict[str, Any]``, so a misspelt column or a datetime read as a
string failed only at run time, in whichever caller touched it (issue 14). Each table now has a
frozen dataclass naming every column with its Python type, and mypy (strict on lib/) checks
every caller. A row is a snapshot: change the database through the store, then read it again
(or :func:`dataclasses.replace` it, as :meth:`ControlPlane.transition` does).

Field names and order are the table's columns, exactly (``test_row_types`` checks it), so
:func:`from_row` builds a row from a SQLAlchemy ``Row`` by name. JSON columns hold documents,
not columns: they stay :data:`JsonObject` / ``list``. SQLite hands back naive datetimes; every
time stored is UTC, so :func:`from_row` makes them aware once, here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar

import sqlalchemy as sa

#: A JSON object column (settings, config, context, counts, a manifest...).
JsonObject: TypeAlias = dict[str, Any]

R = TypeVar("R")


def aware(value: object) -> object:
    """``value`` with a naive datetime read as UTC (SQLite drops the offset)."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def from_row(cls: Callable[..., R], row: sa.Row[Any]) -> R:
    """The typed row ``cls`` of a ``SELECT *`` result row (column name = field name)."""
    return cls(**{k: aware(v) for k, v in row._mapping.items()})


@dataclass(frozen=True, slots=True)
class Tenant:
    """``tenants``: a customer of the platform and its policies."""

    id: str
    name: str
    settings: JsonObject
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Source:
    """``sources``: a catalog entry (an EHR, a payer, a network) and what discovery found."""

    id: str
    name: str
    vendor: str
    kind: str
    fhir_base_url: str | None
    patterns: list[str]
    config: JsonObject
    smart_config: JsonObject | None
    capability_statement: JsonObject | None
    discovered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Organization:
    """``organizations``: an organization that authorized a tenant at a source."""

    id: str
    tenant_id: str
    source_id: str
    name: str
    config: JsonObject
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Connection:
    """``connections``: one authorization and its lifecycle state."""

    id: str
    tenant_id: str
    pattern: str
    source_id: str
    organization_id: str | None
    patient_ref: str | None
    source_patient_id: str | None
    state: str
    state_reason: str | None
    scopes_requested: str | None
    scopes_granted: str | None
    token_expires_at: datetime | None
    has_refresh_token: bool
    context: JsonObject
    last_pull_at: datetime | None
    next_pull_due: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """``connection_events``: a state change or a notable fact of one connection."""

    id: int
    connection_id: str
    at: datetime
    event_type: str
    from_state: str | None
    to_state: str | None
    detail: JsonObject


@dataclass(frozen=True, slots=True)
class Pull:
    """``pull_history``: one pull of one source (running, success, partial or failed)."""

    id: int
    tenant_id: str
    pattern: str
    source_id: str
    organization_id: str | None
    connection_id: str | None
    run_id: str | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    counts: JsonObject
    error: str | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """``audit_log``: one allowed or refused access decision (append-only)."""

    id: int
    at: datetime
    tenant_id: str
    actor: str
    action: str
    person_id: str | None
    purpose: str | None
    decision: str
    reason: str | None
    evidence: JsonObject
    gateways: list[Any]
    responders: list[Any]
    documents: list[Any]


@dataclass(frozen=True, slots=True)
class BulkExport:
    """``bulk_exports``: one Bulk Data export, from reservation to landing."""

    id: str
    tenant_id: str
    organization_id: str | None
    source_id: str
    connection_id: str | None
    polling_url: str | None
    status: str
    request: JsonObject
    manifest: JsonObject | None
    transaction_time: str | None
    since: str | None
    error: str | None
    counts: JsonObject
    run_id: str | None
    kicked_off_at: datetime
    next_poll_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Event:
    """``events``: one outbox event (webhooks fan these out)."""

    id: int
    tenant_id: str
    type: str
    payload: JsonObject
    created_at: datetime


#: Table name -> row type, for the schema check in the tests.
ROW_TYPES: dict[str, type] = {
    "tenants": Tenant,
    "sources": Source,
    "organizations": Organization,
    "connections": Connection,
    "connection_events": ConnectionEvent,
    "pull_history": Pull,
    "audit_log": AuditEntry,
    "bulk_exports": BulkExport,
    "events": Event,
}

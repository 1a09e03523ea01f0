"""Typed rows of the operations tables in :mod:`~medblocks_pipelines.lib.ops.tables`.

Same rules as :mod:`medblocks_pipelines.lib.registry.rows` (issue 14): one frozen dataclass per
table, fields = columns in order (``test_row_types`` checks it), built with
:func:`~medblocks_pipelines.lib.registry.rows.from_row` so times come back UTC-aware on SQLite
too. Secrets never appear here: they live in the vault.
"""

from dataclasses import dataclass
from datetime import datetime

from medblocks_pipelines.lib.registry.rows import JsonObject


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """``webhook_endpoints``: a tenant's receiver, its event filter and state."""

    id: str
    tenant_id: str
    url: str
    event_types: list[str]
    description: str | None
    status: str
    disabled_reason: str | None
    consecutive_failures: int
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """``webhook_deliveries``: one message per (endpoint, event) and its retry state."""

    id: int
    message_id: str
    endpoint_id: str
    event_id: int
    tenant_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """``webhook_attempts``: one HTTP attempt of a delivery (never the response body)."""

    id: int
    delivery_id: int
    endpoint_id: str
    attempt: int
    at: datetime
    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: int


@dataclass(frozen=True, slots=True)
class ExportDestination:
    """``export_destinations``: a tenant's export target (credentials are in the vault)."""

    id: str
    tenant_id: str
    kind: str
    url: str
    config: JsonObject
    enabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ExportRun:
    """``export_runs``: one export run to one destination."""

    id: int
    tenant_id: str
    destination_id: str
    seq: int
    mode: str
    status: str
    counts: JsonObject
    error: str | None
    run_id: str | None
    started_at: datetime
    finished_at: datetime | None


#: Table name -> row type, for the schema check in the tests.
ROW_TYPES: dict[str, type] = {
    "webhook_endpoints": WebhookEndpoint,
    "webhook_deliveries": WebhookDelivery,
    "webhook_attempts": WebhookAttempt,
    "export_destinations": ExportDestination,
    "export_runs": ExportRun,
}

"""Operations tables on the control-plane metadata: webhooks and exports.

- ``webhook_endpoints``: a tenant's receiver URL, its event filter and state; the signing secret
  lives in the vault under ``webhook:<endpoint id>``, never in this table.
- ``webhook_fanout``: one row per outbox event already fanned out to endpoints (so an event is
  fanned out exactly once even when two sensors tick at the same time).
- ``webhook_cursor``: the low-water mark below which every outbox event is fanned out.
- ``webhook_deliveries``: one message per (endpoint, event), with its retry state.
- ``webhook_attempts``: every HTTP attempt of every delivery (status code, error class, duration).
- ``export_destinations`` / ``export_runs``: per-tenant export targets and one row per export run.

The tables are part of the control plane's migrations (``EXTRA_TABLE_MODULES``, revision 0003).
"""

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.registry.schema import metadata


def _ts(name: str, **kw: Any) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), **kw)


webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("url", sa.String(1000), nullable=False),
    # Event types this endpoint wants; "*" or "connection.*" style prefixes allowed.
    sa.Column("event_types", sa.JSON, nullable=False, default=list),
    sa.Column("description", sa.String(500)),
    # enabled | disabled
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("disabled_reason", sa.String(200)),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, default=0),
    _ts("failing_since"),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
)

webhook_fanout = sa.Table(
    "webhook_fanout",
    metadata,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("deliveries", sa.Integer, nullable=False, default=0),
    _ts("at", nullable=False),
)

webhook_cursor = sa.Table(
    "webhook_cursor",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("last_event_id", sa.Integer, nullable=False, default=0),
    _ts("updated_at", nullable=False),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # The Standard Webhooks ``webhook-id``: the same on every retry so receivers can deduplicate.
    sa.Column("message_id", sa.String(80), nullable=False, unique=True),
    sa.Column("endpoint_id", sa.String(64), nullable=False, index=True),
    sa.Column("event_id", sa.Integer, nullable=False),
    sa.Column("tenant_id", sa.String(64), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    # pending | succeeded | failed (schedule exhausted)
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    _ts("next_attempt_at", index=True),
    _ts("last_attempt_at"),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.String(200)),
    _ts("created_at", nullable=False),
    sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.Integer, nullable=False, index=True),
    sa.Column("endpoint_id", sa.String(64), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    _ts("at", nullable=False),
    # success | http_error | timeout | connection_error
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("status_code", sa.Integer),
    # Error class only: never the receiver's response body.
    sa.Column("error", sa.String(200)),
    sa.Column("duration_ms", sa.Integer, nullable=False, default=0),
)

export_destinations = sa.Table(
    "export_destinations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    # ndjson | parquet | fhir
    sa.Column("kind", sa.String(16), nullable=False),
    # A folder path, an s3:// URL, or a FHIR base URL.
    sa.Column("url", sa.String(1000), nullable=False),
    # gzip, resource_types, bundle_size, endpoint_url (S3-compatible), ... never secrets.
    sa.Column("config", sa.JSON, nullable=False, default=dict),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    _ts("created_at", nullable=False),
)

export_runs = sa.Table(
    "export_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("destination_id", sa.String(64), nullable=False, index=True),
    # The export's sequence number at the destination (deterministic object names).
    sa.Column("seq", sa.Integer, nullable=False),
    # backfill | delta
    sa.Column("mode", sa.String(16), nullable=False),
    # running | success | failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("counts", sa.JSON, nullable=False, default=dict),
    sa.Column("error", sa.String(500)),
    sa.Column("run_id", sa.String(64)),
    _ts("started_at", nullable=False),
    _ts("finished_at"),
)

TABLES = (
    webhook_endpoints,
    webhook_fanout,
    webhook_cursor,
    webhook_deliveries,
    webhook_attempts,
    export_destinations,
    export_runs,
)

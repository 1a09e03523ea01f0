"""Control-plane tables (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Pattern modules may add their own tables to :data:`metadata` in their own modules; import them in
:func:`load_all_tables` so migrations and ``create_all`` see every table.
"""

import importlib
from datetime import datetime
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _ts(name: str, **kw: Any) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), **kw)


tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # Policies: delete-on-revoke, allowed network purposes, webhook defaults...
    sa.Column("settings", sa.JSON, nullable=False, default=dict),
    _ts("created_at", nullable=False),
)

sources = sa.Table(
    "sources",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("vendor", sa.String(64), nullable=False),
    # ehr | payer | network
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("fhir_base_url", sa.String(500)),
    sa.Column("patterns", sa.JSON, nullable=False, default=list),
    # client ids, scopes, cadence, vendor profile, rate limit... never secrets (those go to the vault)
    sa.Column("config", sa.JSON, nullable=False, default=dict),
    sa.Column("smart_config", sa.JSON),
    sa.Column("capability_statement", sa.JSON),
    _ts("discovered_at"),
    _ts("created_at", nullable=False),
)

organizations = sa.Table(
    "organizations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("source_id", sa.String(64), sa.ForeignKey("sources.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("config", sa.JSON, nullable=False, default=dict),
    _ts("created_at", nullable=False),
)

connections = sa.Table(
    "connections",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("pattern", sa.String(32), nullable=False),
    sa.Column("source_id", sa.String(64), sa.ForeignKey("sources.id"), nullable=False, index=True),
    sa.Column("organization_id", sa.String(64), sa.ForeignKey("organizations.id")),
    # The tenant's own reference for the patient (patient access) and the source's patient id.
    sa.Column("patient_ref", sa.String(200)),
    sa.Column("source_patient_id", sa.String(200)),
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("state_reason", sa.String(500)),
    sa.Column("scopes_requested", sa.Text),
    sa.Column("scopes_granted", sa.Text),
    _ts("token_expires_at"),
    sa.Column("has_refresh_token", sa.Boolean, nullable=False, default=False),
    # Launch context (encounter, fhirUser, fhirContext), return URL, pending-state hash...
    sa.Column("context", sa.JSON, nullable=False, default=dict),
    _ts("last_pull_at"),
    _ts("next_pull_due"),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
)

connection_events = sa.Table(
    "connection_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "connection_id", sa.String(64), sa.ForeignKey("connections.id"), nullable=False, index=True
    ),
    _ts("at", nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("from_state", sa.String(20)),
    sa.Column("to_state", sa.String(20)),
    sa.Column("detail", sa.JSON, nullable=False, default=dict),
)

pull_history = sa.Table(
    "pull_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("pattern", sa.String(32), nullable=False),
    sa.Column("source_id", sa.String(64), nullable=False),
    sa.Column("organization_id", sa.String(64)),
    sa.Column("connection_id", sa.String(64), index=True),
    sa.Column("run_id", sa.String(64)),
    _ts("started_at", nullable=False),
    _ts("finished_at"),
    # running | success | partial | failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("counts", sa.JSON, nullable=False, default=dict),
    sa.Column("error", sa.Text),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _ts("at", nullable=False),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("person_id", sa.String(200)),
    sa.Column("purpose", sa.String(64)),
    # allowed | refused
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("evidence", sa.JSON, nullable=False, default=dict),
    sa.Column("gateways", sa.JSON, nullable=False, default=list),
    sa.Column("responders", sa.JSON, nullable=False, default=list),
    sa.Column("documents", sa.JSON, nullable=False, default=list),
)

secrets = sa.Table(
    "secrets",
    metadata,
    sa.Column("name", sa.String(300), primary_key=True),
    sa.Column("tenant_id", sa.String(64), index=True),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    # Bumped on every write: compare-and-swap for refresh-token rotation across processes.
    sa.Column("version", sa.Integer, nullable=False, default=1),
    _ts("updated_at", nullable=False),
)

bulk_exports = sa.Table(
    "bulk_exports",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("organization_id", sa.String(64)),
    sa.Column("source_id", sa.String(64), nullable=False),
    sa.Column("connection_id", sa.String(64)),
    sa.Column("polling_url", sa.String(1000)),
    # starting | kicked_off | ready | downloading | completed | failed | cancelled | expired
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("request", sa.JSON, nullable=False, default=dict),
    sa.Column("manifest", sa.JSON),
    sa.Column("transaction_time", sa.String(64)),
    sa.Column("since", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Column("counts", sa.JSON, nullable=False, default=dict),
    sa.Column("run_id", sa.String(64)),
    _ts("kicked_off_at", nullable=False),
    _ts("next_poll_at"),
    _ts("updated_at", nullable=False),
)

#: Export statuses of an organization's in-flight export: at most one row per (tenant, org) may
#: hold one of them (``starting`` = reserved, kick-off request not answered yet).
BULK_IN_FLIGHT = ("starting", "kicked_off", "ready", "downloading")

# A partial unique index makes "one export in flight per organization" atomic: of two concurrent
# kick-offs, the second insert fails and that caller reuses the winner's export (issue 13).
sa.Index(
    "uq_bulk_exports_in_flight",
    bulk_exports.c.tenant_id,
    bulk_exports.c.organization_id,
    unique=True,
    sqlite_where=bulk_exports.c.status.in_(BULK_IN_FLIGHT),
    postgresql_where=bulk_exports.c.status.in_(BULK_IN_FLIGHT),
)

watermarks = sa.Table(
    "watermarks",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("value", sa.String(200)),
    _ts("updated_at", nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False, default=dict),
    _ts("created_at", nullable=False),
)

# Modules that add tables to ``metadata``; imported lazily to keep this module import-light.
EXTRA_TABLE_MODULES: tuple[str, ...] = (
    "medblocks_pipelines.lib.network.tables",
    "medblocks_pipelines.lib.cds.tables",
    "medblocks_pipelines.lib.ops.tables",
)


def load_all_tables() -> sa.MetaData:
    """Import every module that defines tables on :data:`metadata` and return it."""
    for name in EXTRA_TABLE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return metadata

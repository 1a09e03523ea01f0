"""Network-pattern tables on the control-plane metadata.

- ``network_documents``: the document registry, keyed by (tenant, homeCommunityId,
  repositoryUniqueId, documentUniqueId), so nothing is fetched twice (SPECS 5.5).
- ``network_queries``: one row per query attempt (allowed or refused) with the exchanges made,
  the events relied on (for T-TRTMNT repeat checks) and counts.
- ``network_relationship_events``: encounters, appointments, orders... that document a treatment
  relationship or a clinical event for a person at an organization (written by other patterns or
  by an operator; read by the policy and by the trigger sensor).

They are part of the control plane's migrations (``EXTRA_TABLE_MODULES``, revision 0002).
"""

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.registry.schema import metadata


def _ts(name: str, **kw: Any) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), **kw)


network_documents = sa.Table(
    "network_documents",
    metadata,
    sa.Column("tenant_id", sa.String(64), primary_key=True),
    sa.Column("home_community_id", sa.String(200), primary_key=True),
    sa.Column("repository_unique_id", sa.String(200), primary_key=True),
    sa.Column("document_unique_id", sa.String(200), primary_key=True),
    sa.Column("network_id", sa.String(64), nullable=False),
    sa.Column("person_id", sa.String(200), index=True),
    sa.Column("organization", sa.String(200)),
    sa.Column("mime_type", sa.String(100)),
    sa.Column("on_demand", sa.Boolean, nullable=False, default=False),
    # On-demand retrieves return a new snapshot id each time.
    sa.Column("new_document_unique_id", sa.String(200)),
    sa.Column("size", sa.Integer),
    sa.Column("sha256", sa.String(64)),
    # converted | stored | quarantined
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("resources", sa.Integer, nullable=False, default=0),
    sa.Column("quarantined", sa.Integer, nullable=False, default=0),
    sa.Column("query_id", sa.Integer),
    _ts("fetched_at", nullable=False),
)

network_queries = sa.Table(
    "network_queries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("network_id", sa.String(64)),
    sa.Column("person_id", sa.String(200), index=True),
    sa.Column("purpose", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    # request | event | sweep
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(200)),
    sa.Column("audit_id", sa.Integer),
    sa.Column("run_id", sa.String(64)),
    # running | success | partial | failed | refused
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("event_refs", sa.JSON, nullable=False, default=list),
    sa.Column("exchanges", sa.JSON, nullable=False, default=list),
    sa.Column("counts", sa.JSON, nullable=False, default=dict),
    _ts("at", nullable=False),
    _ts("finished_at"),
)

network_relationship_events = sa.Table(
    "network_relationship_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("person_id", sa.String(200), nullable=False, index=True),
    # encounter | appointment | order | referral | adt | message | transition
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("ref", sa.String(200), nullable=False),
    sa.Column("organization_id", sa.String(64)),
    _ts("at", nullable=False),
    _ts("recorded_at", nullable=False),
    sa.Column("detail", sa.JSON, nullable=False, default=dict),
    sa.UniqueConstraint("tenant_id", "ref", name="uq_network_relationship_events_tenant_ref"),
)

TABLES = (network_documents, network_queries, network_relationship_events)


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes: treat them as UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)

"""Clinician-workflow tables on the control-plane metadata.

- ``cds_jti``: every CDS Hooks JWT ``jti`` accepted, per issuer, until it expires (replay refusal,
  SPECS §4.6). The primary key makes a concurrent replay fail in the database, across processes.
- ``cds_feedback``: card feedback (SPECS §4.5), de-duplicated on (service, card, outcome, time).

The tables are part of the control plane's migrations (``EXTRA_TABLE_MODULES``, revision 0003).
"""

from datetime import UTC, datetime

import sqlalchemy as sa

from medblocks_pipelines.lib.registry.schema import metadata

cds_jti = sa.Table(
    "cds_jti",
    metadata,
    sa.Column("iss", sa.String(500), primary_key=True),
    sa.Column("jti", sa.String(200), primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

cds_feedback = sa.Table(
    "cds_feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("service_id", sa.String(64), nullable=False),
    sa.Column("card", sa.String(100), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("outcome_timestamp", sa.String(40), nullable=False),
    sa.Column("accepted_suggestions", sa.JSON, nullable=False, default=list),
    sa.Column("override_reason", sa.JSON),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint(
        "service_id", "card", "outcome", "outcome_timestamp", name="uq_cds_feedback_once"
    ),
)

TABLES = (cds_jti, cds_feedback)


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)

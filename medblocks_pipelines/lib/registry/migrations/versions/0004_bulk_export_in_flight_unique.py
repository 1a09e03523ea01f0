"""one in-flight bulk export per organization

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 13:05:00

A partial unique index on ``bulk_exports (tenant_id, organization_id)`` over the in-flight
statuses, on SQLite and PostgreSQL alike: two concurrent kick-offs of one organization can no
longer both start an export (issue 13). Rows that already break the rule (the race happened before
this revision) are resolved first: the newest in-flight export of each organization stays, older
ones become ``cancelled`` with the reason in ``error``.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

IN_FLIGHT = ("starting", "kicked_off", "ready", "downloading")


def upgrade() -> None:
    bind = op.get_bind()
    exports = sa.table(
        "bulk_exports",
        sa.column("id", sa.String),
        sa.column("tenant_id", sa.String),
        sa.column("organization_id", sa.String),
        sa.column("status", sa.String),
        sa.column("error", sa.Text),
        sa.column("kicked_off_at", sa.DateTime(timezone=True)),
    )
    rows = bind.execute(
        sa.select(exports.c.id, exports.c.tenant_id, exports.c.organization_id)
        .where(exports.c.status.in_(IN_FLIGHT), exports.c.organization_id.is_not(None))
        .order_by(exports.c.kicked_off_at.desc(), exports.c.id.desc())
    ).all()
    seen: set[tuple[str, str]] = set()
    for row in rows:
        key = (row.tenant_id, row.organization_id)
        if key in seen:
            bind.execute(
                exports.update()
                .where(exports.c.id == row.id)
                .values(
                    status="cancelled",
                    error="superseded: a newer export of this organization was in flight",
                )
            )
        seen.add(key)
    status: sa.ColumnClause[str] = sa.column("status", sa.String)
    with op.batch_alter_table("bulk_exports", schema=None) as batch_op:
        batch_op.create_index(
            "uq_bulk_exports_in_flight",
            ["tenant_id", "organization_id"],
            unique=True,
            sqlite_where=status.in_(IN_FLIGHT),
            postgresql_where=status.in_(IN_FLIGHT),
        )


def downgrade() -> None:
    with op.batch_alter_table("bulk_exports", schema=None) as batch_op:
        batch_op.drop_index("uq_bulk_exports_in_flight")

"""The control plane's records of what happened: pull history, the audit log, watermarks and
the outbox (a part of :class:`~medblocks_pipelines.lib.registry.store.ControlPlane`)."""

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.errors import NotFound, RegistryError
from medblocks_pipelines.lib.registry import schema as t
from medblocks_pipelines.lib.registry.rows import AuditEntry, Event, Pull
from medblocks_pipelines.lib.registry.store_base import StoreBase, _outbox, _row, _rows, utcnow


class HistoryStore(StoreBase):
    """Pulls, audit, watermarks and outbox events."""

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

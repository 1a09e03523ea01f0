"""Bulk Data exports in the control plane, from the reserved in-flight slot to landing (a part of
:class:`~medblocks_pipelines.lib.registry.store.ControlPlane`)."""

import secrets as pysecrets
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.registry import schema as t
from medblocks_pipelines.lib.registry.rows import BulkExport
from medblocks_pipelines.lib.registry.store_base import StoreBase, _rows, utcnow


class BulkExportStore(StoreBase):
    """The ``bulk_exports`` table: save, reserve, poll state, list."""

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

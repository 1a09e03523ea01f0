"""What every part of the control plane shares: the engine and vault, typed row reads, the
outbox append, and the get/list/update/upsert helpers (split out of ``store.py``, issue 14).

:class:`~medblocks_pipelines.lib.registry.store.ControlPlane` is the one public class; the
``store_*`` modules are its parts, one per group of tables.
"""

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from medblocks_pipelines.lib.errors import NotFound, RegistryError
from medblocks_pipelines.lib.partitions import normalise_id
from medblocks_pipelines.lib.registry import schema as t
from medblocks_pipelines.lib.registry.rows import from_row
from medblocks_pipelines.lib.registry.vault import Vault

R = TypeVar("R")


def check_id(value: str, what: str) -> str:
    """Registry ids are already normalised (``[a-z0-9-]``) so partition keys map back to them."""
    if not value or normalise_id(value) != value:
        raise RegistryError(
            f"{what} id {value!r} is not normalised",
            hint=f"use lower-case letters, digits and '-', e.g. {normalise_id(value or 'x')!r}",
        )
    return value


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _row(cls: Callable[..., R], row: sa.Row[Any] | None) -> R | None:
    return None if row is None else from_row(cls, row)


def _rows(cls: Callable[..., R], rows: Iterable[sa.Row[Any]]) -> list[R]:
    return [from_row(cls, r) for r in rows]


def _outbox(
    conn: sa.Connection, tenant_id: str, type: str, payload: Mapping[str, Any], at: datetime
) -> int:
    """Append an outbox event inside the caller's transaction (it commits with the change)."""
    res = conn.execute(
        t.events.insert().values(
            tenant_id=tenant_id, type=type, payload=dict(payload), created_at=at
        )
    )
    return int(res.inserted_primary_key[0])  # type: ignore[index]


# The command that lists each kind of registry row (foundation/test_cli_hints.py checks them).
_LIST_HINTS = {
    "tenants": "list them: medblocks tenants list",
    "sources": "list them: medblocks sources list",
    "organizations": "list them: medblocks orgs list --tenant TENANT",
    "connections": "list them: medblocks connections list --tenant TENANT",
    "bulk_exports": "an organization's exports: medblocks bulk status --tenant TENANT --org ORG",
}


class StoreBase:
    """The engine and vault, and the row helpers the store parts build on."""

    def __init__(self, engine: sa.Engine, vault: Vault) -> None:
        self.engine = engine
        self.vault = vault

    def _maybe(self, cls: Callable[..., R], table: sa.Table, id: str) -> R | None:
        with self.engine.connect() as conn:
            return _row(cls, conn.execute(sa.select(table).where(table.c.id == id)).first())

    def _get(self, cls: Callable[..., R], table: sa.Table, id: str, what: str) -> R:
        row = self._maybe(cls, table, id)
        if row is None:
            raise NotFound(f"{what} {id!r} not found", hint=_LIST_HINTS.get(table.name))
        return row

    def _list(self, cls: Callable[..., R], table: sa.Table, *, order_by: Any) -> list[R]:
        with self.engine.connect() as conn:
            return _rows(cls, conn.execute(sa.select(table).order_by(order_by)))

    def _update(self, table: sa.Table, id: str, fields: Mapping[str, Any], what: str) -> None:
        with self.engine.begin() as conn:
            res = conn.execute(table.update().where(table.c.id == id).values(**fields))
            if res.rowcount == 0:
                raise NotFound(f"{what} {id!r} not found")

    def _upsert(
        self,
        table: sa.Table,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        timestamp: str = "created_at",
    ) -> None:
        cond = sa.and_(*(table.c[k] == v for k, v in key.items()))
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(sa.literal(1)).select_from(table).where(cond)).first()
            if exists:
                upd = dict(values)
                if timestamp == "updated_at":
                    upd["updated_at"] = utcnow()
                conn.execute(table.update().where(cond).values(**upd))
            else:
                conn.execute(table.insert().values(**key, **values, **{timestamp: utcnow()}))

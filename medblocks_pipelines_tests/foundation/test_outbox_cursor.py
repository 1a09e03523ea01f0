"""Sensors read the outbox with a low-water cursor: an event whose transaction commits after a
higher id was read is still delivered, once; the cursor's memory stays bounded."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry import schema as t
from medblocks_pipelines.lib.registry.outbox import OutboxCursor, read_new_events
from medblocks_pipelines.lib.registry.rows import Event
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines_tests.conftest import fresh_pg_database


def _ids(rows: list[Event]) -> list[int]:
    return [r.id for r in rows]


def test_late_commit_below_the_cursor_is_read_once(settings: Settings) -> None:
    cp = open_control_plane(settings)
    try:
        ids = [cp.emit_event("acme", "x.happened", {"n": n}) for n in range(3)]
        # id 2 was taken by a transaction that has not committed yet: readers cannot see it.
        with cp.engine.begin() as conn:
            late = dict(
                conn.execute(sa.select(t.events).where(t.events.c.id == ids[1])).mappings().one()
            )
            conn.execute(t.events.delete().where(t.events.c.id == ids[1]))
        rows, cursor = read_new_events(cp, OutboxCursor())
        assert _ids(rows) == [ids[0], ids[2]]
        with cp.engine.begin() as conn:  # ...and now it commits
            conn.execute(t.events.insert().values(**late))
        rows, cursor = read_new_events(cp, OutboxCursor.parse(cursor.dump()))
        assert _ids(rows) == [ids[1]]
        rows, cursor = read_new_events(cp, OutboxCursor.parse(cursor.dump()))
        assert rows == []
        # Once everything is older than the settle window, the mark moves and forgets the ids.
        later = datetime.now(UTC) + timedelta(minutes=5)
        rows, cursor = read_new_events(cp, cursor, now=later)
        assert rows == [] and cursor.low == ids[2] and cursor.seen == set()
    finally:
        cp.engine.dispose()


def test_earlier_cursor_forms_are_read() -> None:
    assert OutboxCursor.parse("41").low == 41
    old = OutboxCursor.parse('{"last": 7, "recent": {"k": 1.0}}')
    assert old.low == 7 and old.extra == {"recent": {"k": 1.0}}
    again = OutboxCursor.parse(old.dump())
    assert again.low == 7 and again.extra == {"recent": {"k": 1.0}} and again.seen == set()
    assert OutboxCursor.parse(None).low == 0 and OutboxCursor.parse("garbage").low == 0


@pytest.fixture
def pg_cp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:  # type: ignore[no-untyped-def]
    with fresh_pg_database("outbox") as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        cp = open_control_plane(get_settings(tmp_path / "data"))
        try:
            yield cp
        finally:
            cp.engine.dispose()


@pytest.mark.postgres
def test_postgres_commit_order_does_not_lose_events(pg_cp: ControlPlane) -> None:
    """Two real transactions: the one holding the lower id commits last."""
    first = pg_cp.emit_event("acme", "x.happened", {"n": 0})
    slow = pg_cp.engine.connect()
    tx = slow.begin()
    slow_id = slow.execute(
        t.events.insert().values(
            tenant_id="acme", type="x.happened", payload={"n": 1}, created_at=datetime.now(UTC)
        )
    ).inserted_primary_key[0]  # type: ignore[index]
    fast_id = pg_cp.emit_event("acme", "x.happened", {"n": 2})
    assert slow_id < fast_id
    rows, cursor = read_new_events(pg_cp, OutboxCursor())
    assert _ids(rows) == [first, fast_id]
    tx.commit()
    slow.close()
    rows, cursor = read_new_events(pg_cp, OutboxCursor.parse(cursor.dump()))
    assert _ids(rows) == [slow_id]
    assert read_new_events(pg_cp, cursor)[0] == []

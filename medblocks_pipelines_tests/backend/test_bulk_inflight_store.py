"""One in-flight Bulk export per organization, enforced by the control plane (issue 13): the partial
unique index ``uq_bulk_exports_in_flight`` (migration 0004) on SQLite and on PostgreSQL, raced
from two connections at once, and the migration's clean-up of rows that already broke the rule.
"""

import threading
from typing import Any

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry.db import alembic_config, make_engine, upgrade
from medblocks_pipelines.lib.registry.schema import load_all_tables
from medblocks_pipelines.lib.settings import Settings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cp(request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database_url")
        engine = make_engine(url)
        load_all_tables().drop_all(engine)  # each test starts from an empty schema
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        upgrade(engine)  # production's explicit step: `medblocks db upgrade`
        engine.dispose()
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        from medblocks_pipelines.lib.settings import get_settings

        settings = get_settings()
    store = open_control_plane(settings)
    store.add_tenant("acme", "Acme")
    store.add_source("src", "EHR", "generic", "ehr", "http://ehr.test/fhir", ["backend"], {})
    store.add_organization("org-a", "acme", "src", "Org A", {})
    store.add_organization("org-b", "acme", "src", "Org B", {})
    yield store
    store.engine.dispose()


def _reserve(cp: ControlPlane, org: str = "org-a") -> str | None:
    return cp.reserve_bulk_export(
        tenant_id="acme", source_id="src", organization_id=org, request={"level": "group"}
    )


def test_second_reservation_of_an_org_fails_until_the_first_ends(cp: ControlPlane) -> None:
    first = _reserve(cp)
    assert first is not None
    assert _reserve(cp) is None
    assert _reserve(cp, "org-b") is not None  # another organization is independent
    cp.start_bulk_export(first, polling_url="http://ehr.test/status/1")
    assert _reserve(cp) is None  # kicked_off is still in flight
    cp.update_bulk_export(first, status="completed")
    assert _reserve(cp) is not None


def test_two_connections_racing_start_one_export(cp: ControlPlane, settings: Settings) -> None:
    url = cp.engine.url.render_as_string(hide_password=False)
    stores = [ControlPlane(make_engine(url), cp.vault) for _ in range(2)]
    barrier = threading.Barrier(2)
    got: list[str | None] = []

    def go(store: ControlPlane) -> None:
        barrier.wait()
        got.append(_reserve(store))

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.engine.dispose()
    assert sorted(x is None for x in got) == [False, True]
    assert len(cp.list_bulk_exports(organization_id="org-a")) == 1


def test_migration_0004_resolves_existing_duplicates(cp: ControlPlane) -> None:
    from alembic import command

    command.downgrade(alembic_config(cp.engine), "0003")
    ids = [
        cp.save_bulk_export(
            tenant_id="acme",
            source_id="src",
            organization_id="org-a",
            polling_url=f"http://ehr.test/status/{n}",
            request={},
        )
        for n in range(2)
    ]
    with cp.engine.begin() as conn:  # make the order of kick-offs unambiguous
        table: Any = sa.table("bulk_exports", sa.column("id"), sa.column("kicked_off_at"))
        conn.execute(
            table.update()
            .where(table.c.id == ids[0])
            .values(kicked_off_at=sa.literal("2020-01-01 00:00:00+00:00"))
        )
    command.upgrade(alembic_config(cp.engine), "head")
    assert cp.get_bulk_export(ids[0]).status == "cancelled"
    assert "superseded" in cp.get_bulk_export(ids[0]).error
    assert cp.get_bulk_export(ids[1]).status == "kicked_off"
    assert _reserve(cp) is None

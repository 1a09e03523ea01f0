"""The control plane on both backends: registry CRUD, the connection lifecycle, events, outbox,
pull history, audit, watermarks, and concurrent writers from several processes."""

import multiprocessing as mp
from pathlib import Path

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.errors import InvalidTransition, NotFound, RegistryError
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry.db import alembic_config, make_engine, upgrade
from medblocks_pipelines.lib.registry.declarative import apply_registry
from medblocks_pipelines.lib.registry.schema import load_all_tables
from medblocks_pipelines.lib.settings import Settings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cp(request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database_url")
        engine = make_engine(url)
        # Each test starts from an empty schema in the session's database.
        load_all_tables().drop_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        upgrade(engine)  # production's explicit step: `medblocks db upgrade`
        engine.dispose()
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        from medblocks_pipelines.lib.settings import get_settings

        settings = get_settings()
    store = open_control_plane(settings)
    yield store
    store.engine.dispose()


def _seed(cp: ControlPlane) -> None:
    cp.add_tenant("acme", "Acme", {"delete_on_revoke": True})
    cp.add_source(
        "mercy-ehr", "Mercy EHR", "epic", "ehr", "http://x/fhir", ["backend", "patient_access"]
    )
    cp.add_organization("mercy", "acme", "mercy-ehr", "Mercy General")


def test_registry_roundtrip_and_idempotent_upsert(cp: ControlPlane) -> None:
    _seed(cp)
    _seed(cp)  # applying the same registry twice changes nothing
    assert [t.id for t in cp.list_tenants()] == ["acme"]
    assert cp.get_tenant("acme").settings == {"delete_on_revoke": True}
    assert cp.get_source("mercy-ehr").patterns == ["backend", "patient_access"]
    assert cp.get_organization("mercy").tenant_id == "acme"
    cp.update_source_discovery("mercy-ehr", smart_config={"token_endpoint": "http://x/token"})
    src = cp.get_source("mercy-ehr")
    assert src.smart_config["token_endpoint"] == "http://x/token"
    assert src.discovered_at.tzinfo is not None


@pytest.mark.parametrize(
    "bad",
    [
        "Acme",  # upper case would not survive a partition key round trip
        "acme corp",  # space
        "acme.corp",  # the partition-key separator
        "",  # empty
    ],
)
def test_ids_must_be_normalised(cp: ControlPlane, bad: str) -> None:
    with pytest.raises(RegistryError):
        cp.add_tenant(bad, "x")


def test_unknown_kind_pattern_and_foreign_keys_refused(cp: ControlPlane) -> None:
    with pytest.raises(RegistryError):
        cp.add_source("s", "S", "v", "fax", None, [])
    with pytest.raises(RegistryError):
        cp.add_source("s", "S", "v", "ehr", None, ["telepathy"])
    with pytest.raises(NotFound):
        cp.add_organization("o", "nobody", "s", "O")
    with pytest.raises(NotFound):
        cp.get_connection("conn_missing")


def test_lifecycle_events_and_outbox_in_one_transaction(cp: ControlPlane) -> None:
    _seed(cp)
    cid = cp.create_connection(
        tenant_id="acme", pattern="patient_access", source_id="mercy-ehr", patient_ref="app-user-1"
    )
    assert cp.get_connection(cid).state == "pending"
    cp.transition(cid, "active")
    cp.record_event(cid, "token.refreshed", {"expires_in": 3600})
    cp.transition(cid, "refresh_failed", reason="invalid_grant")
    cp.transition(cid, "active", reason="re-consented")
    cp.transition(cid, "revoked", reason="patient revoked")
    with pytest.raises(InvalidTransition):
        cp.transition(cid, "active")
    events = cp.connection_events(cid)
    assert [e.event_type for e in events] == [
        "created",
        "state.active",
        "token.refreshed",
        "state.refresh_failed",
        "state.active",
        "state.revoked",
    ]
    assert events[3].detail == {"reason": "invalid_grant"}
    outbox = [e.type for e in cp.list_events(tenant_id="acme")]
    assert outbox == [
        "connection.activated",
        "connection.refresh_failed",
        "connection.activated",
        "connection.revoked",
    ]
    with pytest.raises(RegistryError):
        cp.update_connection(cid, state="active")


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (["active"], True),
        (["failed"], True),
        (["failed", "active"], False),  # failed is terminal
        (["active", "expired", "active"], True),  # re-consent after expiry
        (["active", "pending"], False),  # never back to pending
        (["revoked", "active"], False),  # revoked is terminal
    ],
)
def test_transition_table(cp: ControlPlane, path: list[str], allowed: bool) -> None:
    _seed(cp)
    cid = cp.create_connection(tenant_id="acme", pattern="backend", source_id="mercy-ehr")
    if allowed:
        for state in path:
            cp.transition(cid, state)
        assert cp.get_connection(cid).state == path[-1]
    else:
        with pytest.raises(InvalidTransition):
            for state in path:
                cp.transition(cid, state)


def test_pull_history_audit_watermarks_and_exports(cp: ControlPlane) -> None:
    _seed(cp)
    pid = cp.start_pull(
        tenant_id="acme",
        pattern="backend",
        source_id="mercy-ehr",
        organization_id="mercy",
        run_id="r1",
    )
    cp.finish_pull(pid, status="partial", counts={"Patient": 3, "Observation": 10})
    (pull,) = cp.list_pulls(tenant_id="acme")
    assert pull.status == "partial" and pull.counts["Observation"] == 10
    assert pull.finished_at >= pull.started_at
    with pytest.raises(RegistryError):
        cp.finish_pull(pid, status="maybe", counts={})

    aid = cp.audit(
        tenant_id="acme",
        actor="dr-x",
        action="xcpd",
        decision="refused",
        purpose="T-TREAT",
        reason="no treatment relationship",
    )
    assert cp.list_audit(tenant_id="acme")[0].id == aid
    assert cp.list_events(tenant_id="acme")[-1].type == "network.query_refused"

    assert cp.get_watermark("acme/mercy/since") is None
    cp.set_watermark("acme/mercy/since", "2026-01-01T00:00:00Z")
    cp.set_watermark("acme/mercy/since", "2026-02-01T00:00:00Z")
    assert cp.get_watermark("acme/mercy/since") == "2026-02-01T00:00:00Z"

    eid = cp.save_bulk_export(
        tenant_id="acme",
        source_id="mercy-ehr",
        organization_id="mercy",
        polling_url="http://x/poll/1",
        request={"_type": "Patient"},
    )
    assert [e.id for e in cp.list_bulk_exports(status="kicked_off")] == [eid]
    cp.update_bulk_export(eid, status="completed", transaction_time="2026-02-01T00:00:00Z")
    assert cp.list_bulk_exports(status=["kicked_off", "ready"]) == []


def test_registry_as_code(cp: ControlPlane) -> None:
    doc = {
        "tenants": [{"id": "acme", "name": "Acme"}],
        "sources": [
            {"id": "payer", "name": "Payer", "kind": "payer", "patterns": ["patient_access"]}
        ],
        "organizations": [{"id": "plan", "tenant": "acme", "source": "payer", "name": "Plan"}],
    }
    assert apply_registry(cp, doc) == {"tenants": 1, "sources": 1, "organizations": 1}
    assert apply_registry(cp, doc) == {"tenants": 1, "sources": 1, "organizations": 1}
    assert len(cp.list_organizations("acme")) == 1


def test_migrations_match_the_tables(cp: ControlPlane) -> None:
    """Alembic sees no difference between the migrated schema and the table definitions."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with cp.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), load_all_tables())
    assert diff == []
    assert alembic_config(cp.engine).get_main_option("script_location")


def _writer(url: str, key: str, worker: int, n: int) -> None:
    import os

    os.environ["MEDBLOCKS_SECRET_KEY"] = key
    from medblocks_pipelines.lib.registry.db import make_engine
    from medblocks_pipelines.lib.registry.store import ControlPlane
    from medblocks_pipelines.lib.registry.vault import Vault

    engine = make_engine(url)
    store = ControlPlane(engine, Vault(engine, [key.encode()]))
    for i in range(n):
        cid = store.create_connection(
            tenant_id="acme", pattern="backend", source_id="mercy-ehr", id=f"c-{worker}-{i}"
        )
        store.transition(cid, "active")
        pid = store.start_pull(
            tenant_id="acme", pattern="backend", source_id="mercy-ehr", connection_id=cid
        )
        store.finish_pull(pid, status="success", counts={"Patient": 1})
    engine.dispose()


def test_concurrent_writers_from_processes(cp: ControlPlane) -> None:
    """Four processes write at once (as sensors, runs and web requests do); nothing is lost."""
    import os

    _seed(cp)
    url = cp.engine.url.render_as_string(hide_password=False)
    key = os.environ["MEDBLOCKS_SECRET_KEY"]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, key, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with cp.engine.connect() as conn:
        n_conn = conn.execute(sa.text("SELECT count(*) FROM connections")).scalar_one()
        n_events = conn.execute(sa.text("SELECT count(*) FROM connection_events")).scalar_one()
    assert n_conn == 60
    assert n_events == 120
    assert len(cp.list_pulls(tenant_id="acme", limit=1000)) == 60


def test_sqlite_file_is_wal(settings: Settings) -> None:
    store = open_control_plane(settings)
    with store.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
    assert mode == "wal"
    assert Path(settings.data_dir / "control.db").exists()

"""The typed control-plane rows (issue 14): each row type names exactly its table's columns with
the right Python types, and a row written through the stores comes back as that type with
values of those types, on SQLite and on PostgreSQL."""

import dataclasses
import types
import typing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.ops import exports as ex
from medblocks_pipelines.lib.ops import rows as ops_rows
from medblocks_pipelines.lib.ops import tables as ot
from medblocks_pipelines.lib.ops import webhooks as wh
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry import rows as reg_rows
from medblocks_pipelines.lib.registry.schema import load_all_tables
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines_tests.conftest import fresh_pg_database

ROW_TYPES: dict[str, type] = {**reg_rows.ROW_TYPES, **ops_rows.ROW_TYPES}


def _allowed(annotation: Any) -> tuple[set[type], bool]:
    """The runtime classes an annotation admits, and whether it admits None."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        classes: set[type] = set()
        optional = False
        for arg in typing.get_args(annotation):
            if arg is type(None):
                optional = True
            else:
                classes |= _allowed(arg)[0]
        return classes, optional
    origin = typing.get_origin(annotation)
    return {origin if origin is not None else annotation}, False


@pytest.mark.parametrize("table_name", sorted(ROW_TYPES))
def test_row_type_names_every_column_with_its_type(table_name: str) -> None:
    table = load_all_tables().tables[table_name]
    row_type = ROW_TYPES[table_name]
    params = getattr(row_type, "__dataclass_params__", None)
    assert params is not None and params.frozen, f"{row_type.__name__} is not a frozen dataclass"
    assert hasattr(row_type, "__slots__"), f"{row_type.__name__} has no slots"
    fields = [f.name for f in dataclasses.fields(row_type)]
    assert fields == [c.name for c in table.columns]
    hints = typing.get_type_hints(row_type)
    for column in table.columns:
        classes, optional = _allowed(hints[column.name])
        assert optional == bool(column.nullable), (table_name, column.name)
        expected = column.type.python_type if not isinstance(column.type, sa.JSON) else None
        if expected is None:  # JSON: an object or an array, never a scalar column type
            assert classes <= {dict, list}, (table_name, column.name, classes)
        else:
            assert classes == {expected}, (table_name, column.name, classes, expected)


def _check_types(row: object) -> None:
    """Every field holds a value of its annotated type; every time is UTC-aware."""
    hints = typing.get_type_hints(type(row))
    for f in dataclasses.fields(row):  # type: ignore[arg-type]
        value = getattr(row, f.name)
        classes, optional = _allowed(hints[f.name])
        if value is None:
            assert optional, (type(row).__name__, f.name)
            continue
        assert isinstance(value, tuple(classes)), (type(row).__name__, f.name, type(value))
        # bool is an int in Python: an int column must not come back as a bool, or vice versa.
        assert (bool in classes) == isinstance(value, bool), (type(row).__name__, f.name)
        if isinstance(value, datetime):
            assert value.utcoffset() == timedelta(0), (type(row).__name__, f.name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cp(
    request: pytest.FixtureRequest,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ControlPlane]:
    if request.param == "sqlite":
        store = open_control_plane(settings)
        yield store
        store.engine.dispose()
        return
    with fresh_pg_database("rows") as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        store = open_control_plane(get_settings(tmp_path / "pg-data"))
        try:
            yield store
        finally:
            store.engine.dispose()


def test_rows_round_trip_with_their_types(
    cp: ControlPlane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE", "1")  # the receiver is never called
    cp.add_tenant("acme", "Acme", {"delete_on_revoke": True})
    cp.add_source("ehr", "EHR", "epic", "ehr", "http://x/fhir", ["backend", "patient_access"])
    cp.update_source_discovery("ehr", smart_config={"issuer": "http://x"})
    cp.add_organization("org-1", "acme", "ehr", "Org One", {"group_id": "g1"})
    conn_id = cp.create_connection(
        tenant_id="acme", pattern="patient_access", source_id="ehr", context={"k": [1, 2]}
    )
    expires = datetime(2027, 5, 6, 7, 8, 9, tzinfo=UTC)
    cp.update_connection(conn_id, token_expires_at=expires, has_refresh_token=True)
    moved = cp.transition(conn_id, "active", reason="consented")
    pull_id = cp.start_pull(tenant_id="acme", pattern="backend", source_id="ehr", run_id="r1")
    cp.finish_pull(pull_id, status="partial", counts={"Patient": 3}, error="one page failed")
    audit_id = cp.audit(
        tenant_id="acme",
        actor="dr-a",
        action="network.query",
        decision="refused",
        purpose="T-TREAT",
        reason="no_relationship",
        evidence={"relied_on": []},
        responders=["riverside"],
    )
    export_id = cp.save_bulk_export(
        tenant_id="acme",
        source_id="ehr",
        organization_id="org-1",
        polling_url="http://x/status/1",
        request={"types": ["Patient"]},
        since="2026-01-01T00:00:00Z",
    )
    cp.update_bulk_export(export_id, manifest={"output": []}, counts={"landed": 5})
    endpoint_id, _ = wh.add_endpoint(cp, tenant_id="acme", url="http://127.0.0.1:9/hook")
    ex.add_destination(
        cp, id="dest", tenant_id="acme", kind="ndjson", url=str(tmp_path / "out"), config={"a": 1}
    )
    now = datetime.now(UTC)
    with cp.engine.begin() as conn:
        delivery_id = conn.execute(
            ot.webhook_deliveries.insert().values(
                message_id="msg_1",
                endpoint_id=endpoint_id,
                event_id=1,
                tenant_id="acme",
                event_type="connection.activated",
                status="pending",
                attempts=1,
                last_status_code=503,
                created_at=now,
            )
        ).inserted_primary_key[0]  # type: ignore[index]
        conn.execute(
            ot.webhook_attempts.insert().values(
                delivery_id=delivery_id,
                endpoint_id=endpoint_id,
                attempt=1,
                at=now,
                outcome="http_error",
                status_code=503,
                duration_ms=12,
            )
        )
        conn.execute(
            ot.export_runs.insert().values(
                tenant_id="acme",
                destination_id="dest",
                seq=1,
                mode="backfill",
                status="success",
                counts={"Patient": 2},
                started_at=now,
            )
        )

    tenant = cp.get_tenant("acme")
    assert isinstance(tenant, reg_rows.Tenant) and tenant.settings == {"delete_on_revoke": True}
    source = cp.get_source("ehr")
    assert isinstance(source, reg_rows.Source)
    assert source.patterns == ["backend", "patient_access"]
    assert source.smart_config == {"issuer": "http://x"} and source.discovered_at is not None
    org = cp.get_organization("org-1")
    assert isinstance(org, reg_rows.Organization) and org.config == {"group_id": "g1"}
    conn_row = cp.get_connection(conn_id)
    assert isinstance(conn_row, reg_rows.Connection)
    assert (conn_row.state, conn_row.state_reason) == ("active", "consented")
    assert conn_row.token_expires_at == expires and conn_row.has_refresh_token is True
    assert conn_row.context == {"k": [1, 2]}
    # transition() hands back the row as it now is, without reading it again.
    assert (moved.state, moved.state_reason, moved.updated_at) == (
        "active",
        "consented",
        conn_row.updated_at,
    )
    events = cp.connection_events(conn_id)
    assert [e.event_type for e in events] == ["created", "state.active"]
    assert all(isinstance(e, reg_rows.ConnectionEvent) for e in events)
    (pull,) = cp.list_pulls(tenant_id="acme")
    assert isinstance(pull, reg_rows.Pull) and pull.id == pull_id
    assert (pull.status, pull.counts, pull.error) == ("partial", {"Patient": 3}, "one page failed")
    (audit,) = cp.list_audit(tenant_id="acme")
    assert isinstance(audit, reg_rows.AuditEntry) and audit.id == audit_id
    assert audit.responders == ["riverside"] and audit.documents == []
    export = cp.get_bulk_export(export_id)
    assert isinstance(export, reg_rows.BulkExport)
    assert export.manifest == {"output": []} and export.counts == {"landed": 5}
    outbox = cp.list_events(tenant_id="acme")
    assert {e.type for e in outbox} >= {"connection.activated", "sync.completed"}
    endpoint = wh.get_endpoint(cp, endpoint_id)
    assert isinstance(endpoint, ops_rows.WebhookEndpoint) and endpoint.consecutive_failures == 0
    (delivery,) = wh.list_deliveries(cp)
    assert isinstance(delivery, ops_rows.WebhookDelivery) and delivery.last_status_code == 503
    (attempt,) = wh.list_attempts(cp)
    assert isinstance(attempt, ops_rows.WebhookAttempt) and attempt.duration_ms == 12
    dest = ex.get_destination(cp, "dest")
    assert isinstance(dest, ops_rows.ExportDestination) and dest.enabled is True
    (run,) = ex.list_runs(cp, destination_id="dest")
    assert isinstance(run, ops_rows.ExportRun) and run.counts == {"Patient": 2}

    every = [tenant, source, org, conn_row, moved, *events, pull, audit, export, *outbox]
    every += [endpoint, delivery, attempt, dest, run]
    assert {type(r) for r in every} == set(ROW_TYPES.values())
    for row in every:
        _check_types(row)
    with pytest.raises(dataclasses.FrozenInstanceError):
        conn_row.state = "revoked"  # type: ignore[misc]

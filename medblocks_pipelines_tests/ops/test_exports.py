"""Exports over real servers: a folder, S3 (moto in server mode on loopback), FHIR servers.

The FHIR destination is tested against the sandbox EHR's write API (R4B validation, SMART
write scopes, our Backend Services token) and, for failure scripts, a small strict receiver here
(``application/fhir+json``, transaction Bundles, PUT/DELETE by id, one status per entry).
"""

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_pipelines.lib.errors import ExportError
from medblocks_pipelines.lib.ops import export_files
from medblocks_pipelines.lib.ops import exports as ex
from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_sandbox.run import ServerThread, bind_socket


def _patient(pid: str, family: str, version: str = "1") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": version, "lastUpdated": f"2026-01-0{version}T00:00:00Z"},
        "name": [{"family": family}],
    }


def _obs(oid: str, pid: str, value: str) -> str:
    # Raw text: the decimal 7.10 must reach the destination as written.
    return (
        '{"resourceType":"Observation","id":"%s","meta":{"versionId":"1",'
        '"lastUpdated":"2026-01-01T00:00:00Z"},"status":"final","code":{"text":"pulse"},"subject":'
        '{"reference":"Patient/%s"},"valueQuantity":{"value":%s}}' % (oid, pid, value)
    )


def _land(
    settings: Settings, run: str, rows: list[Any], tombstones: tuple[tuple[str, str], ...] = ()
) -> None:
    prov = Provenance("acme", "backend", "mercy", "mercy-general", None, run)
    with LakeWriter(settings.lake_root, prov) as w:
        for r in rows:
            w.add(r if isinstance(r, str) else json.dumps(r))
        for rtype, rid in tombstones:
            w.add_tombstone(rtype, rid, deleted_at="2026-02-01T00:00:00Z")


def _build(cp: ControlPlane, settings: Settings) -> None:
    build_warehouse("acme", settings=settings, control_plane=cp, steps=[])


@pytest.fixture
def warehouse(cp: ControlPlane, settings: Settings) -> Settings:
    """A warehouse with 3 patients and 2 observations for tenant acme."""
    _land(
        settings,
        "run-1",
        [
            _patient("p1", "Ng"),
            _patient("p2", "Ode"),
            _patient("p3", "Li"),
            _obs("o1", "p1", "7.10"),
            _obs("o2", "p2", "5"),
        ],
    )
    _build(cp, settings)
    return settings


def _second_round(cp: ControlPlane, settings: Settings) -> None:
    # p1 changes, p3 is deleted, o3 is new, p2 and the observations are unchanged.
    _land(
        settings,
        "run-2",
        [_patient("p1", "Ng-Smith", "2"), _obs("o3", "p2", "1.50")],
        (("Patient", "p3"),),
    )
    _build(cp, settings)


def _read_ndjson(path: Path) -> list[dict[str, Any]]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode().splitlines() if line]


def test_folder_backfill_then_delta(cp: ControlPlane, warehouse: Settings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ex.add_destination(cp, id="lake-copy", tenant_id="acme", kind="ndjson", url=str(out))
    first = ex.run_export(cp, warehouse, "lake-copy")
    assert (first.seq, first.mode, first.counts_by_type) == (
        1,
        "backfill",
        {"Patient": 3, "Observation": 2},
    )
    base = out / "acme" / "lake-copy" / "000001"
    manifest = json.loads((base / "manifest.json").read_text())
    assert [(o["type"], o["count"]) for o in manifest["output"]] == [
        ("Patient", 3),
        ("Observation", 2),
    ]
    assert {p["id"] for p in _read_ndjson(base / "Patient.ndjson.gz")} == {"p1", "p2", "p3"}
    raw = gzip.decompress((base / "Observation.ndjson.gz").read_bytes()).decode()
    assert '"value":7.10' in raw  # exact decimals

    # Nothing changed: an empty delta, still recorded.
    empty = ex.run_export(cp, warehouse, "lake-copy")
    assert (empty.seq, empty.mode, empty.exported, empty.deleted) == (2, "delta", 0, 0)

    _second_round(cp, warehouse)
    delta = ex.run_export(cp, warehouse, "lake-copy")
    assert delta.seq == 3 and delta.counts_by_type == {"Patient": 1, "Observation": 1}
    base3 = out / "acme" / "lake-copy" / "000003"
    (p1,) = _read_ndjson(base3 / "Patient.ndjson.gz")
    assert p1["name"][0]["family"] == "Ng-Smith"
    (bundle,) = _read_ndjson(base3 / "deleted.ndjson.gz")
    assert bundle["type"] == "transaction"
    assert bundle["entry"] == [{"request": {"method": "DELETE", "url": "Patient/p3"}}]
    assert cp.get_watermark(ex.watermark_key("lake-copy")) == "3"
    runs = ex.list_runs(cp, destination_id="lake-copy")
    assert [(r.seq, r.status, r.counts["exported"]) for r in runs] == [
        (3, "success", 2),
        (2, "success", 0),
        (1, "success", 5),
    ]
    events = [e for e in cp.list_events(tenant_id="acme") if e.type.startswith("export.")]
    assert [e.payload["seq"] for e in events] == [1, 2, 3]


def test_parquet_destination(cp: ControlPlane, warehouse: Settings, tmp_path: Path) -> None:
    ex.add_destination(
        cp,
        id="pq",
        tenant_id="acme",
        kind="parquet",
        url=f"file://{tmp_path}/pq",
        config={"resource_types": ["Patient"]},
    )
    res = ex.run_export(cp, warehouse, "pq")
    assert res.counts_by_type == {"Patient": 3}
    path = tmp_path / "pq" / "acme" / "pq" / "000001" / "Patient.parquet"
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT resource_id, resource FROM '{path}' ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["p1", "p2", "p3"]
    assert json.loads(rows[0][1])["name"][0]["family"] == "Ng"


class _Boom(Exception):
    pass


def test_failed_run_is_recorded_and_the_retry_has_no_duplicates(
    cp: ControlPlane, warehouse: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    ex.add_destination(
        cp, id="d", tenant_id="acme", kind="ndjson", url=str(out), config={"gzip": False}
    )
    real = export_files._write_ndjson
    calls = {"n": 0}

    def flaky(fs: Any, path: str, batches: Any, gz: bool) -> tuple[int, int]:
        calls["n"] += 1
        result = real(fs, path, batches, gz)
        if calls["n"] == 2:
            raise _Boom()  # the disk filled up after the first type was written
        return result

    monkeypatch.setattr(export_files, "_write_ndjson", flaky)
    with pytest.raises(ExportError):
        ex.run_export(cp, warehouse, "d")
    (failed,) = ex.list_runs(cp, destination_id="d")
    assert failed.status == "failed" and failed.error == "_Boom"
    assert cp.get_watermark(ex.watermark_key("d")) is None
    base = out / "acme" / "d" / "000001"
    assert not (base / "manifest.json").exists()  # not committed: consumers ignore it
    assert [e.type for e in cp.list_events(tenant_id="acme")][-1] == "export.failed"

    # Meanwhile a patient was deleted at the source: the retry rewrites sequence 1 from scratch.
    _land(warehouse, "run-x", [], (("Patient", "p2"),))
    _build(cp, warehouse)
    retry = ex.run_export(cp, warehouse, "d")
    assert (retry.seq, retry.mode) == (1, "backfill")
    ids = [p["id"] for p in _read_ndjson(base / "Patient.ndjson")]
    assert sorted(ids) == ["p1", "p3"]
    assert sorted(f.name for f in base.iterdir()) == [
        "Observation.ndjson",
        "Patient.ndjson",
        "manifest.json",
    ]


def test_concurrent_run_is_refused(cp: ControlPlane, warehouse: Settings, tmp_path: Path) -> None:
    ex.add_destination(cp, id="d2", tenant_id="acme", kind="ndjson", url=str(tmp_path / "o"))
    dest = ex.get_destination(cp, "d2")
    from datetime import UTC, datetime

    ex._start_run(cp, dest, 1, "backfill", None, datetime.now(UTC))
    with pytest.raises(ExportError, match="already running"):
        ex.run_export(cp, warehouse, "d2")


def test_no_warehouse_is_a_clear_error(
    cp: ControlPlane, settings: Settings, tmp_path: Path
) -> None:
    ex.add_destination(cp, id="d3", tenant_id="acme", kind="ndjson", url=str(tmp_path / "o"))
    with pytest.raises(ExportError, match="no warehouse"):
        ex.run_export(cp, settings, "d3")
    assert ex.list_runs(cp, destination_id="d3")[0].status == "failed"


# -- S3 (moto server) --------------------------------------------------------------------------
def test_s3_destination(
    cp: ControlPlane, warehouse: Settings, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket="exports")
    ex.add_destination(
        cp,
        id="s3dest",
        tenant_id="acme",
        kind="ndjson",
        url="s3://exports/medblocks",
        config={"endpoint_url": s3_endpoint, "region": "us-east-1"},
        credentials={"key": "test", "secret": "test"},
    )
    first = ex.run_export(cp, warehouse, "s3dest")
    _second_round(cp, warehouse)
    ex.run_export(cp, warehouse, "s3dest")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="exports")["Contents"])
    assert keys == [
        "medblocks/acme/s3dest/000001/Observation.ndjson.gz",
        "medblocks/acme/s3dest/000001/Patient.ndjson.gz",
        "medblocks/acme/s3dest/000001/manifest.json",
        "medblocks/acme/s3dest/000002/Observation.ndjson.gz",
        "medblocks/acme/s3dest/000002/Patient.ndjson.gz",
        "medblocks/acme/s3dest/000002/deleted.ndjson.gz",
        "medblocks/acme/s3dest/000002/manifest.json",
    ]
    body = s3.get_object(Bucket="exports", Key="medblocks/acme/s3dest/000001/Patient.ndjson.gz")
    patients = [json.loads(x) for x in gzip.decompress(body["Body"].read()).splitlines()]
    assert len(patients) == first.counts_by_type["Patient"] == 3
    # The credentials live in the vault, not in the destination row.
    assert "test" not in json.dumps(ex.get_destination(cp, "s3dest").config).replace(
        "us-east-1", ""
    )


# -- FHIR destination ----------------------------------------------------------------------------
class FhirReceiver:
    """A strict, minimal FHIR transaction endpoint keeping resources by Type/id."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}
        self.raw: list[bytes] = []
        self.fail_next: int = 0

    async def transaction(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0] != "application/fhir+json":
            return Response(status_code=415)
        body = await request.body()
        self.raw.append(body)
        if self.fail_next:
            self.fail_next -= 1
            return JSONResponse({"resourceType": "OperationOutcome", "issue": []}, status_code=500)
        bundle = json.loads(body)
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=400)
        out = []
        for entry in bundle["entry"]:
            req = entry["request"]
            rtype, rid = req["url"].split("/")
            if req["method"] == "PUT":
                res = entry["resource"]
                if (res["resourceType"], res["id"]) != (rtype, rid):
                    return JSONResponse({"resourceType": "OperationOutcome"}, status_code=400)
                status = "200 OK" if req["url"] in self.store else "201 Created"
                self.store[req["url"]] = res
            elif req["method"] == "DELETE":
                self.store.pop(req["url"], None)
                status = "204 No Content"
            else:
                return JSONResponse({"resourceType": "OperationOutcome"}, status_code=400)
            out.append({"response": {"status": status}})
        return JSONResponse(
            {"resourceType": "Bundle", "type": "transaction-response", "entry": out},
            media_type="application/fhir+json",
        )


@pytest.fixture
def fhir_receiver() -> Iterator[tuple[str, FhirReceiver]]:
    state = FhirReceiver()
    app = Starlette(routes=[Route("/fhir/", state.transaction, methods=["POST"])])
    sock = bind_socket()
    host, port = sock.getsockname()[:2]
    server = ServerThread(sock, app, name="fhir-receiver").start()
    try:
        yield f"http://{host}:{port}/fhir", state
    finally:
        server.stop()


def test_fhir_transactions_put_by_id_and_delete(
    cp: ControlPlane, warehouse: Settings, fhir_receiver: tuple[str, FhirReceiver]
) -> None:
    url, srv = fhir_receiver
    ex.add_destination(
        cp,
        id="ehr2",
        tenant_id="acme",
        kind="fhir",
        url=url,
        config={"bundle_size": 2},
        credentials={"bearer_token": "tok"},
    )
    first = ex.run_export(cp, warehouse, "ehr2")
    assert first.bundles == 3  # 3 patients in bundles of 2, then 2 observations
    assert set(srv.store) == {
        "Patient/p1",
        "Patient/p2",
        "Patient/p3",
        "Observation/o1",
        "Observation/o2",
    }
    assert b'"value":7.10' in srv.raw[-1]
    # Patients go before the observations that reference them.
    assert b'"Patient"' in srv.raw[0] and b'"Observation"' not in srv.raw[0]

    _second_round(cp, warehouse)
    srv.fail_next = 1  # the destination is down for the first bundle of the delta
    with pytest.raises(ExportError, match="refused a transaction"):
        ex.run_export(cp, warehouse, "ehr2")
    assert ex.list_runs(cp, destination_id="ehr2")[0].error.startswith("ExportError")
    retry = ex.run_export(cp, warehouse, "ehr2")
    assert retry.seq == 2 and retry.deleted == 1
    assert set(srv.store) == {
        "Patient/p1",
        "Patient/p2",
        "Observation/o1",
        "Observation/o2",
        "Observation/o3",
    }
    assert srv.store["Patient/p1"]["name"][0]["family"] == "Ng-Smith"


def test_fhir_destination_needs_http(cp: ControlPlane) -> None:
    from medblocks_pipelines.lib.errors import ConfigError

    with pytest.raises(ConfigError):
        ex.add_destination(cp, id="x", tenant_id="acme", kind="fhir", url="/tmp/nope")
    with pytest.raises(ConfigError):
        ex.add_destination(cp, id="y", tenant_id="acme", kind="csv", url="/tmp/nope")


def test_unreachable_fhir_destination(cp: ControlPlane, warehouse: Settings) -> None:
    ex.add_destination(cp, id="gone", tenant_id="acme", kind="fhir", url="http://127.0.0.1:9/fhir")
    with httpx.Client(timeout=2) as http, pytest.raises(ExportError, match="unreachable"):
        ex.run_export(cp, warehouse, "gone", http=http)


# -- Dagster asset and CLI -----------------------------------------------------------------------
def test_tenant_exports_asset(cp: ControlPlane, warehouse: Settings, tmp_path: Path) -> None:
    import dagster as dg

    from medblocks_pipelines.defs.shared.exports import tenant_exports
    from medblocks_pipelines.defs.shared.resources import PlatformResource

    ex.add_destination(cp, id="good", tenant_id="acme", kind="ndjson", url=str(tmp_path / "g"))
    ex.add_destination(cp, id="paused", tenant_id="acme", kind="ndjson", url=str(tmp_path / "p"))
    ex.set_destination_enabled(cp, "paused", False)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("tenants", ["acme"])
    platform = PlatformResource(data_dir=str(warehouse.data_dir))
    result = dg.materialize(
        [tenant_exports],
        partition_key="acme",
        resources={"platform": platform},
        instance=instance,
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("exports__tenant_exports")
    assert mat.metadata["exported"].value == 5 and mat.metadata["destinations"].value == 1
    assert not (tmp_path / "p").exists()

    # A failing destination fails the step after the others ran, and says which one.
    ex.add_destination(cp, id="bad", tenant_id="acme", kind="fhir", url="http://127.0.0.1:9/fhir")
    result = dg.materialize(
        [tenant_exports],
        partition_key="acme",
        resources={"platform": platform},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    assert [r.status for r in ex.list_runs(cp, destination_id="good")] == ["success"] * 2


def test_exports_cli(
    cp: ControlPlane, warehouse: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from medblocks_pipelines.cli.ops import exports as exports_cli

    runner = CliRunner()
    res = runner.invoke(
        exports_cli,
        ["add", "cli-dest", "--tenant", "acme", "--kind", "parquet", "--url", str(tmp_path / "c")],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(exports_cli, ["run", "cli-dest", "--tenant", "acme"])
    assert res.exit_code == 0 and "backfill #1: 5 resources" in res.output, res.output
    for args in (["list"], ["runs"], ["pause", "cli-dest"], ["resume", "cli-dest"]):
        assert runner.invoke(exports_cli, [*args, "--tenant", "acme"]).exit_code == 0


def test_sensor_requests_an_export_after_a_warehouse_build(
    cp: ControlPlane, warehouse: Settings, tmp_path: Path
) -> None:
    import dagster as dg

    from medblocks_pipelines.defs.shared.exports import (
        WAREHOUSE_KEY,
        exports_after_warehouse_sensor,
    )
    from medblocks_pipelines.defs.shared.resources import PlatformResource

    instance = dg.DagsterInstance.ephemeral()
    platform = PlatformResource(data_dir=str(warehouse.data_dir))
    for tenant in ("acme", "other", "acme"):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=WAREHOUSE_KEY, partition=tenant)
        )
    with dg.build_sensor_context(instance=instance, resources={"platform": platform}) as ctx:
        result = exports_after_warehouse_sensor(ctx)
    assert result.run_requests == []  # no destinations yet
    cursor = result.cursor

    ex.add_destination(cp, id="s1", tenant_id="acme", kind="ndjson", url=str(tmp_path / "s"))
    for tenant in ("acme", "other", "acme"):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=WAREHOUSE_KEY, partition=tenant)
        )
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"platform": platform}
    ) as ctx:
        result = exports_after_warehouse_sensor(ctx)
    assert [r.partition_key for r in result.run_requests] == ["acme"]
    assert int(result.cursor) > int(cursor)


@pytest.mark.postgres
def test_exports_with_a_postgresql_control_plane(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medblocks_pipelines.lib.registry import open_control_plane
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines_tests.conftest import fresh_pg_database

    with fresh_pg_database("exports") as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        pg_settings = get_settings()
        pg = open_control_plane(pg_settings)
        pg.add_tenant("acme", "Acme")
        _land(pg_settings, "run-1", [_patient("p1", "Ng"), _obs("o1", "p1", "7.10")])
        _build(pg, pg_settings)
        ex.add_destination(pg, id="pgd", tenant_id="acme", kind="ndjson", url=str(tmp_path / "o"))
        assert ex.run_export(pg, pg_settings, "pgd").exported == 2
        _land(pg_settings, "run-2", [_patient("p1", "Ng-Smith", "2")])
        _build(pg, pg_settings)
        second = ex.run_export(pg, pg_settings, "pgd")
        assert (second.seq, second.counts_by_type) == (2, {"Patient": 1})
        assert pg.get_watermark(ex.watermark_key("pgd")) == "2"
        assert [e.type for e in pg.list_events(tenant_id="acme")] == ["export.completed"] * 2
        pg.engine.dispose()


# -- FHIR destination: the sandbox EHR ----------------------------------------------------------
def test_fhir_destination_is_the_sandbox_ehr_with_backend_services_auth(
    cp: ControlPlane, settings: Settings
) -> None:
    """Transactions into the sandbox EHR's write API (R4B-validated, SMART c/u/d scopes), with
    our own SMART Backend Services token: a backfill, then a delta with an update and a delete."""
    from medblocks_pipelines.lib.smart.keys import KeyStore
    from medblocks_sandbox.generator import PopulationSpec, generate_population
    from medblocks_sandbox.run import start_sandbox

    keys = KeyStore(cp.vault)
    keys.generate("ES384")
    pop = generate_population(PopulationSpec(seed=77, persons=3))
    org = pop.organizations[0].id
    ours = {(r["resourceType"], r["id"]): r for r in pop.resources_for(org)}
    prov = Provenance("acme", "backend", "mercy", "mercy-general", None, "run-1")
    with LakeWriter(settings.lake, prov) as w:
        for r in ours.values():
            w.add(json.dumps(r))
    _build(cp, settings)

    with start_sandbox(base_port=0, persons=2, seed=5, roles=["ehr"]) as sb:
        dest = sb.orgs_of("ehr")[0]
        sb.admin(
            dest.org_id,
            "clients",
            {
                "client_id": "acme-exporter",
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": keys.jwks(),
                "scopes": ["system/*.cud"],
            },
        )
        store = sb.org_handles(dest.org_id)["store"]
        ex.add_destination(
            cp,
            id="sandbox-ehr",
            tenant_id="acme",
            kind="fhir",
            url=dest.fhir_base,
            config={"auth": "smart-backend", "client_id": "acme-exporter", "bundle_size": 50},
        )
        first = ex.run_export(cp, settings, "sandbox-ehr")
        assert first.mode == "backfill" and sum(first.counts_by_type.values()) == len(ours)
        for (rtype, rid), resource in ours.items():
            stored = store.get(rtype, rid)
            assert stored is not None, (rtype, rid)
            assert {k: v for k, v in stored.items() if k != "meta"} == {
                k: v for k, v in resource.items() if k != "meta"
            }

        patient = next(r for (t, _), r in ours.items() if t == "Patient")
        gone = next(rid for (t, rid) in ours if t == "Observation")
        changed = {
            **patient,
            "meta": {"versionId": "9", "lastUpdated": "2030-01-01T00:00:00Z"},
            "name": [{"family": "Renamed", "given": ["Pat"]}],
        }
        prov2 = Provenance("acme", "backend", "mercy", "mercy-general", None, "run-2")
        with LakeWriter(settings.lake, prov2) as w:
            w.add(json.dumps(changed))
            w.add_tombstone("Observation", gone, deleted_at="2030-01-02T00:00:00Z")
        _build(cp, settings)
        delta = ex.run_export(cp, settings, "sandbox-ehr")
        assert (delta.mode, delta.counts_by_type, delta.deleted) == ("delta", {"Patient": 1}, 1)
        assert store.get("Patient", patient["id"])["name"][0]["family"] == "Renamed"
        assert len(store.history("Patient", patient["id"])) == 2
        assert store.get("Observation", gone) is None
        # Re-running the delta sends nothing new and changes nothing at the destination.
        again = ex.run_export(cp, settings, "sandbox-ehr")
        assert sum(again.counts_by_type.values()) == 0 and again.deleted == 0
        assert len(store.history("Patient", patient["id"])) == 2


def test_destination_config_is_data_not_sql(
    cp: ControlPlane, warehouse: Settings, tmp_path: Path
) -> None:
    """Exports run no user SQL: resource_types and sources are bound parameters, so SQL in them
    selects nothing and reads nothing (the only SQL surface for analysts is the confined
    ``warehouse query``)."""
    out = tmp_path / "out"
    hostile = "Patient' OR 1=1 UNION SELECT content FROM read_text('/etc/passwd') --"
    ex.add_destination(
        cp,
        id="hostile",
        tenant_id="acme",
        kind="ndjson",
        url=str(out),
        config={"resource_types": [hostile, "Observation"], "sources": None},
    )
    result = ex.run_export(cp, warehouse, "hostile")
    assert result.counts_by_type == {"Observation": 2}
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"root:" not in written

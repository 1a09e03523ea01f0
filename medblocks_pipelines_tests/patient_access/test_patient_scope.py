"""Patient-scoped pulls that cannot leak, over loopback against the sandbox EHR's fault profiles.

Covers (issue 12): a server whose ``next`` links keep only the paging parameters and page through
every patient (``next_link_drops_params``), a search page carrying another patient's entry
(``foreign_entry_in_search``), a server without ``category`` search (``no_category_search``) or
without a CapabilityStatement, a 401 with a text/plain body (``plain_text_401``), a wrong
``Bundle.total``, and honest outcomes: partial pulls with reasons in pull history, the CLI table,
Dagster metadata and the warehouse ``quarantine`` table; a sync in which every pull failed exits
non-zero and its Dagster run fails.
"""

from collections import Counter
from collections.abc import Iterator
from typing import Any

import dagster as dg
import duckdb
import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.defs.patient_access import assets
from medblocks_pipelines.defs.shared.partitions import patient_access_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.fhir.pull import PullResult, watermark_key
from medblocks_pipelines.lib.fhir.pull_batch import pull_batch
from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines.lib.warehouse.build import build_warehouse, warehouse_path
from medblocks_pipelines.lib.warehouse.lake import quarantine_glob, resources_glob
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv, custom_ehr
from medblocks_sandbox.fhir_params import SHARED_TYPES

FAST = {"backoff": 0.05, "max_backoff": 2.0}
#: Types the pull searches in the patient's compartment (what "everything landed" compares).
SEARCHED = ("Condition", "Encounter", "Observation", "Immunization", "Procedure")


def _connect(env: PatientAccessEnv, config: dict[str, Any] | None = None) -> tuple[Any, str, str]:
    org = env.org("ehr")
    sid = env.add_source(org, config=config)
    conn_id, outcome = env.connect(sid, env.logins(org)[0])
    assert outcome.status == "active", outcome
    return org, sid, conn_id


def _pull(env: PatientAccessEnv, conn_id: str) -> PullResult:
    batch = pull_batch(
        env.cp,
        [conn_id],
        lake_root=env.settings.lake_root,
        run_id="r1",
        http=env.http,
        client_options=FAST,
    )
    (res,) = batch.results
    return res


def _landed(env: PatientAccessEnv, conn_id: str) -> list[tuple[str, str]]:
    glob = resources_glob(env.settings.lake_root, env.tenant)
    with duckdb.connect() as con:
        return con.execute(
            f"SELECT resource_type, resource_id FROM read_parquet('{glob}', "
            "hive_partitioning=false) WHERE connection = ?",
            [conn_id],
        ).fetchall()


def _quarantine_reasons(env: PatientAccessEnv, conn_id: str) -> list[str]:
    glob = quarantine_glob(env.settings.lake_root, env.tenant)
    with duckdb.connect() as con:
        return [
            r[0]
            for r in con.execute(
                f"SELECT reason FROM read_parquet('{glob}', hive_partitioning=false) "
                "WHERE connection = ?",
                [conn_id],
            ).fetchall()
        ]


def _foreign_rows(env: PatientAccessEnv, org: Any, conn_id: str) -> list[tuple[str, str]]:
    """Landed rows that are in no compartment of this connection's patient (sandbox's view)."""
    patient = env.cp.get_connection(conn_id).source_patient_id
    store = env.sandbox.org_handles(org.org_id)["store"]
    return [
        (rtype, rid)
        for rtype, rid in _landed(env, conn_id)
        if rtype not in SHARED_TYPES
        and rtype != "Binary"
        and patient not in store.compartment_of(rtype, rid)
        and not (rtype == "Patient" and rid == patient)
    ]


def _truth(env: PatientAccessEnv, org: Any, conn_id: str) -> Counter[str]:
    patient = env.cp.get_connection(conn_id).source_patient_id
    store = env.sandbox.org_handles(org.org_id)["store"]
    return Counter(r["resourceType"] for r in store.compartment(patient))


@pytest.fixture
def fault(pa_env: PatientAccessEnv) -> Iterator[Any]:
    """Add a fault rule to the first EHR org; every rule added is removed after the test."""
    faults = pa_env.faults(pa_env.org("ehr"))
    added: list[str] = []

    def add(kind: str, **kw: Any) -> str:
        rule = faults.add(kind, **kw)
        added.append(rule)
        return rule

    yield add
    for rule in added:
        faults.remove(rule)


def test_next_link_that_drops_the_patient_lands_no_other_patient(
    pa_env: PatientAccessEnv, fault: Any
) -> None:
    org, sid, conn_id = _connect(pa_env, {"page_size": 3})
    fault("next_link_drops_params", client_id=pa_env.clients[sid])
    res = _pull(pa_env, conn_id)
    assert _foreign_rows(pa_env, org, conn_id) == []
    assert res.anomalies["next_link_lost_parameters"] >= 1
    # The rest came another way (the search re-issued at the server's offset): nothing lost.
    landed = Counter(t for t, _i in _landed(pa_env, conn_id))
    truth = _truth(pa_env, org, conn_id)
    assert {t: landed[t] for t in SEARCHED} == {t: truth[t] for t in SEARCHED}
    assert res.status == "partial"
    history = pa_env.cp.list_pulls(tenant_id="acme")[0]
    assert history.status == "partial"
    assert "next_link_lost_parameters" in history.error
    assert history.counts["_anomaly:next_link_lost_parameters"] >= 1
    # The note names the URL shape, never a value.
    patient = pa_env.cp.get_connection(conn_id).source_patient_id
    assert any("_offset" in n for n in res.anomaly_notes)
    assert not any(patient in n for n in res.anomaly_notes)
    assert pa_env.cp.get_watermark(watermark_key(conn_id)) is None


def test_foreign_entry_in_a_search_page_is_quarantined(
    pa_env: PatientAccessEnv, fault: Any
) -> None:
    org, sid, conn_id = _connect(pa_env)
    fault("foreign_entry_in_search", client_id=pa_env.clients[sid], path=r"/Condition$", count=1)
    res = _pull(pa_env, conn_id)
    assert _foreign_rows(pa_env, org, conn_id) == []
    assert res.outside_compartment == 1
    assert _quarantine_reasons(pa_env, conn_id) == ["outside_patient_compartment: Condition"]
    assert res.status == "partial"
    history = pa_env.cp.list_pulls(tenant_id="acme")[0]
    assert history.counts["_outside_patient_compartment"] == 1
    assert "quarantined=1" in history.error
    # The reason class reaches the warehouse's quarantine table.
    build_warehouse("acme", settings=pa_env.settings, control_plane=pa_env.cp)
    con = duckdb.connect(str(warehouse_path(pa_env.settings, "acme")), read_only=True)
    try:
        found = con.execute(
            "SELECT resource_type, reason FROM quarantine WHERE connection = ?", [conn_id]
        ).fetchall()
    finally:
        con.close()
    assert [(t, r.split(":")[0]) for t, r in found] == [
        ("Condition", "outside_patient_compartment")
    ]


@pytest.mark.parametrize(
    "mode",
    [
        "empty",  # category ignored: 0 matches with 200
        "400",  # category refused
    ],
)
def test_observations_land_from_a_server_without_category_search(
    pa_env: PatientAccessEnv, fault: Any, mode: str
) -> None:
    # Metadata is read without a token: the rule applies to every client (removed after).
    fault("no_category_search", mode=mode)
    org, _sid, conn_id = _connect(pa_env)
    res = _pull(pa_env, conn_id)
    truth = _truth(pa_env, org, conn_id)
    assert truth["Observation"] > 0
    assert res.counts["Observation"] == truth["Observation"]
    assert res.status == "success", res.reasons()
    assert "category" not in dict(res.skipped_types)


def test_plain_text_401_on_one_type_is_reported_and_the_rest_lands(
    pa_env: PatientAccessEnv, fault: Any
) -> None:
    org, sid, conn_id = _connect(pa_env)
    fault("plain_text_401", client_id=pa_env.clients[sid], path=r"/Observation$")
    res = _pull(pa_env, conn_id)
    assert res.status == "partial"
    assert res.failures["search_refused"] >= 1
    assert res.counts["Observation"] == 0
    truth = _truth(pa_env, org, conn_id)
    assert res.counts["Condition"] == truth["Condition"]
    history = pa_env.cp.list_pulls(tenant_id="acme")[0]
    assert "search_refused" in history.error
    # Reported clearly: the type, the status and what the body was.
    assert "Observation: HTTP 401" in history.error
    assert "text/plain body, not an OperationOutcome" in history.error


def test_cli_shows_the_anomaly_per_connection(pa_env: PatientAccessEnv, fault: Any) -> None:
    _org, sid, conn_id = _connect(pa_env, {"page_size": 3})
    fault("next_link_drops_params", client_id=pa_env.clients[sid])
    out = CliRunner().invoke(
        main, ["sync", "patient-access", "--tenant", "acme", "--source", sid, "--in-process"]
    )
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith(conn_id))
    assert "partial" in line and "next_link_lost_parameters" in line
    assert "connection" in out.output and "anomalies" in out.output
    # The URL shape of the bad link: path and parameter names, no values.
    assert "(/Observation?_count&_offset) dropped" in out.output


def _revoke(env: PatientAccessEnv, org: Any, sid: str, conn_id: str) -> None:
    patient = env.cp.get_connection(conn_id).source_patient_id
    env.sandbox.admin(
        org.org_id, "revoke-grant", {"client_id": env.clients[sid], "patient": patient}
    )


def test_all_failed_sync_exits_non_zero(pa_env: PatientAccessEnv) -> None:
    org, sid, conn_id = _connect(pa_env)
    _revoke(pa_env, org, sid, conn_id)
    out = CliRunner().invoke(
        main, ["sync", "patient-access", "--tenant", "acme", "--source", sid, "--in-process"]
    )
    assert out.exit_code != 0, out.output
    assert "every pull failed" in out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith(conn_id))
    assert "failed" in line


def test_all_failed_dagster_run_fails_and_the_cli_says_so(
    pa_env: PatientAccessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = pa_env.settings.data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    org, sid, conn_id = _connect(pa_env)
    _revoke(pa_env, org, sid, conn_id)
    out = CliRunner().invoke(main, ["sync", "patient-access", "--tenant", "acme", "--source", sid])
    assert out.exit_code != 0, out.output
    assert "succeeded" not in out.output
    assert "every pull failed" in out.output
    assert any(ln.startswith(conn_id) and "failed" in ln for ln in out.output.splitlines())


def test_dagster_asset_reports_partial_pulls_and_fails_when_all_failed(
    pa_env: PatientAccessEnv, fault: Any
) -> None:
    org, sid, conn_id = _connect(pa_env)
    fault("foreign_entry_in_search", client_id=pa_env.clients[sid], path=r"/Encounter$", count=1)
    key = partition_key("acme", sid)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(str(patient_access_partitions.name), [key])
        result = dg.materialize(
            [assets.patient_access_records],
            instance=instance,
            partition_key=key,
            resources={"platform": PlatformResource()},
        )
        assert result.success
        mat = result.asset_materializations_for_node("patient_access__records")[0]
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["partial_pulls"] == 1
        assert meta["outside_patient_compartment"] == 1
        table = str(meta["pulls"])
        assert conn_id in table and "partial" in table
        _revoke(pa_env, org, sid, conn_id)
        failed = dg.materialize(
            [assets.patient_access_records],
            instance=instance,
            partition_key=key,
            resources={"platform": PlatformResource()},
            run_config={"ops": {"patient_access__records": {"config": {"all_active": True}}}},
            raise_on_error=False,
        )
        assert not failed.success
        (failure,) = [e for e in failed.all_events if e.is_step_failure]
        assert "every pull failed" in str(failure.event_specific_data)


def _no_capability(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    # A server whose /metadata answers something that is not a CapabilityStatement.
    return {"resourceType": "OperationOutcome", "issue": []}


def test_server_without_capability_statement_falls_back_to_the_known_list(
    pa_env: PatientAccessEnv,
) -> None:
    with custom_ehr(pa_env, rewrite=(r"/fhir/metadata$", _no_capability)) as (sid, _e):
        conn_id, outcome = pa_env.connect(sid, pa_env.logins(pa_env.org("ehr"))[0])
        assert outcome.status == "active", outcome
        res = _pull(pa_env, conn_id)
    assert res.anomalies == Counter({"no_capability_statement": 1})
    assert res.status == "partial"
    truth = _truth(pa_env, pa_env.org("ehr"), conn_id)
    assert res.counts["Observation"] == truth["Observation"] > 0


def _wrong_total(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    if body.get("resourceType") != "Bundle" or "_offset" in path:
        return None
    body["total"] = int(body.get("total") or 0) + 5
    return body


def test_bundle_total_that_disagrees_is_an_anomaly(pa_env: PatientAccessEnv) -> None:
    with custom_ehr(pa_env, rewrite=(r"/fhir/Condition$", _wrong_total)) as (sid, _e):
        conn_id, _o = pa_env.connect(sid, pa_env.logins(pa_env.org("ehr"))[0])
        res = _pull(pa_env, conn_id)
    assert res.anomalies["total_mismatch"] == 1
    assert res.status == "partial"
    assert any(n.startswith("Condition: Bundle.total") for n in res.anomaly_notes)

"""The EHR-launch targeted sync under the patient-scope chokepoint, over loopback.

A launch's sync against an EHR whose ``next`` links drop ``patient`` (``next_link_drops_params``)
and whose pages carry another patient's entry (``foreign_entry_in_search``) lands nothing of another
patient and reports the pull as partial in the asset's metadata; a sync in which every pull failed
fails the Dagster run.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import duckdb
import pytest

import medblocks_sandbox.cds_ehr  # noqa: F401  (registers the cds_ehr role)
from medblocks_pipelines.defs.clinician_workflow.assets import clinician_workflow_records
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.lake import resources_glob
from medblocks_pipelines.web.app import create_app
from medblocks_sandbox.drivers.clinician import (
    first_patient,
    launch_in_browser,
    setup_clinician_org,
)
from medblocks_sandbox.fhir_params import SHARED_TYPES
from medblocks_sandbox.run import SandboxHandle, serve, start_sandbox

TENANT = "acme"
ORG = "mercy-general"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    handle = start_sandbox(base_port=0, persons=8, seed=7, roles=["ehr", "cds_ehr"])
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def launched(settings: Settings, sandbox: SandboxHandle) -> Iterator[dict[str, Any]]:
    """One EHR launch of the org's first patient: its connection id, patient and faults."""
    cp = open_control_plane(settings)
    cp.add_tenant(TENANT, "Acme Health")
    faults = sandbox.org_handles(ORG)["faults"]
    with serve(lambda base: create_app(public_base_url=base, settings=settings)) as web:
        ids = setup_clinician_org(sandbox, cp, tenant=TENANT, org=ORG, web_base=web)
        patient = first_patient(sandbox, ORG)
        page = launch_in_browser(sandbox, org=ORG, patient=patient, web_base=web)
        assert page.status_code == 200
        conn = cp.list_connections(pattern="clinician_workflow")[0].id
        try:
            yield {"cp": cp, "patient": patient, "connection": conn, "faults": faults, **ids}
        finally:
            faults.clear()
    cp.engine.dispose()


def _sync(settings: Settings, launched: dict[str, Any]) -> dg.ExecuteInProcessResult:
    key = f"{TENANT}.{launched['organization_id']}"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("clinician_orgs", [key])
        return dg.materialize(
            [clinician_workflow_records],
            partition_key=key,
            instance=instance,
            resources={"platform": PlatformResource(data_dir=str(settings.data_dir))},
            run_config={
                "ops": {
                    "clinician_workflow__records": {
                        "config": {"connection_ids": [launched["connection"]]}
                    }
                }
            },
            raise_on_error=False,
        )


def test_launch_sync_lands_only_the_launched_patient(
    settings: Settings, sandbox: SandboxHandle, launched: dict[str, Any]
) -> None:
    launched["faults"].add("next_link_drops_params")
    launched["faults"].add("foreign_entry_in_search", path=r"/Condition$", count=1)
    cp = launched["cp"]
    source = cp.get_source(launched["source_id"])
    cp.update_source(source.id, config={**(source.config or {}), "page_size": 3})
    out = _sync(settings, launched)
    assert out.success
    meta = out.asset_materializations_for_node("clinician_workflow__records")[0].metadata
    assert meta["partial_pulls"].value == 1
    anomalies = meta["anomalies"].value
    assert isinstance(anomalies, dict) and anomalies["next_link_lost_parameters"] >= 1
    assert meta["outside_patient_compartment"].value == 1
    store = sandbox.org_handles(ORG)["store"]
    glob = resources_glob(settings.lake_root, TENANT)
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT resource_type, resource_id FROM read_parquet('{glob}', "
            "hive_partitioning=false) WHERE connection = ?",
            [launched["connection"]],
        ).fetchall()
    assert rows
    foreign = [
        (t, i)
        for t, i in rows
        if t not in SHARED_TYPES
        and t != "Binary"
        and not (t == "Patient" and i == launched["patient"])
        and launched["patient"] not in store.compartment_of(t, i)
    ]
    assert foreign == []


def test_launch_sync_whose_every_pull_failed_fails_the_run(
    settings: Settings, launched: dict[str, Any]
) -> None:
    # The EHR answers 404 to the Patient read: nothing of this launch can be pulled.
    launched["faults"].add("error_burst", path=r"/fhir/Patient/", status=404, count=None)
    out = _sync(settings, launched)
    assert not out.success
    (failure,) = [e for e in out.all_events if e.is_step_failure]
    assert "every pull failed" in str(failure.event_specific_data)

"""Dagster asset (per tenant.network partition), relationship sensor, and the CLI commands,
against a live sandbox gateway."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from click.testing import CliRunner

from medblocks_pipelines.cli.network import audit_list, network_sync
from medblocks_pipelines.cli.runtime import EMBEDDED_DAGSTER_YAML
from medblocks_pipelines.defs.network.assets import NetworkQueryConfig, network_query_results
from medblocks_pipelines.defs.network.sensors import network_relationship_sensor
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.errors import MedblocksError
from medblocks_pipelines.lib.network.evidence import record_relationship_event
from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines_tests.network.test_query import env  # noqa: F401 - fixture


def _land_patient(e: Any, person: str) -> None:
    """Put the person's Patient in the lake so demographics resolve without being passed in."""
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

    patient = dict(e.population_patient)
    patient["id"] = person
    with LakeWriter(
        e.settings.lake_root,
        Provenance("acme", "clinician_workflow", "mercy", "acme-clinic", None, "r1"),
    ) as w:
        assert w.add(patient)


def test_asset_materializes_partition_with_counts(env: Any, population: Any) -> None:  # noqa: F811
    env.start()
    env.launch()
    env.population_patient = population.resources_for("riverside-health")[0]
    _land_patient(env, "person-1")
    key = partition_key("acme", "sandbox-qhin")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("network_scopes", [key])
        res = dg.materialize(
            [network_query_results],
            partition_key=key,
            instance=instance,
            resources={"platform": PlatformResource(data_dir=str(env.settings.data_dir))},
            run_config=dg.RunConfig(
                {"network__query_results": NetworkQueryConfig(persons=["person-1", "stranger"])}
            ),
        )
        assert res.success
        md = res.get_asset_materialization_events()[0].materialization.metadata
    assert md["queries"].value == 2 and md["refused"].value == 1
    assert md["refusals_by_reason"].data == {"no_treatment_relationship": 1}
    assert md["responders"].data == {"riverside-health": 1, "valley-medical": 1}
    assert md["documents_retrieved"].value == 2 and md["resources_extracted"].value > 20


def test_sensor_requests_runs_for_new_events_only(env: Any) -> None:  # noqa: F811
    env.start()
    key = partition_key("acme", "sandbox-qhin")
    platform = PlatformResource(data_dir=str(env.settings.data_dir))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("network_scopes", [key])
        ctx = dg.build_sensor_context(instance=instance, resources={"platform": platform})
        first = network_relationship_sensor(ctx)
        assert not first.run_requests  # nothing happened yet: no sweep
        record_relationship_event(
            env.cp,
            tenant="acme",
            person="person-2",
            kind="encounter",
            ref="enc-9",
            organization="acme-clinic",
            at=datetime.now(UTC),
        )
        env.launch("person-3")
        ctx = dg.build_sensor_context(
            instance=instance, resources={"platform": platform}, cursor=first.cursor
        )
        second = network_relationship_sensor(ctx)
        [req] = second.run_requests
        assert req.partition_key == key
        cfg = req.run_config["ops"]["network__query_results"]["config"]
        assert cfg["persons"] == ["person-2", "person-3"] and cfg["trigger"] == "event"
        ctx = dg.build_sensor_context(
            instance=instance, resources={"platform": platform}, cursor=second.cursor
        )
        assert not network_relationship_sensor(ctx).run_requests  # same events are not re-queried
    # A person queried recently is not re-queried on a new event.
    env.launch()
    env.query()
    record_relationship_event(
        env.cp,
        tenant="acme",
        person="person-1",
        kind="appointment",
        ref="appt-1",
        organization="acme-clinic",
        at=datetime.now(UTC) + timedelta(days=1),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("network_scopes", [key])
        ctx = dg.build_sensor_context(
            instance=instance, resources={"platform": platform}, cursor=second.cursor
        )
        result = network_relationship_sensor(ctx)
        persons = [
            p
            for r in result.run_requests
            for p in r.run_config["ops"]["network__query_results"]["config"]["persons"]
        ]
        assert "person-1" not in persons


def test_cli_sync_and_audit(env: Any, population: Any, monkeypatch: Any) -> None:  # noqa: F811
    """`medblocks sync network` is a Dagster run: the refusal stays local and is audited, the
    allowed query materializes `network/query_results` in the instance the UI reads."""
    gw = env.start()
    env.population_patient = population.resources_for("riverside-health")[0]
    _land_patient(env, "person-1")
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(env.settings.data_dir))
    home = env.settings.data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(EMBEDDED_DAGSTER_YAML)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    runner = CliRunner()
    refused = runner.invoke(
        network_sync, ["--tenant", "acme", "--person", "person-1", "--purpose", "T-TREAT"]
    )
    assert refused.exit_code == 1 and "no_treatment_relationship" in refused.output
    assert "nothing was sent" in refused.output
    assert gw.seen == []  # the refusal never left the machine
    env.launch()
    ok = runner.invoke(
        network_sync, ["--tenant", "acme", "--person", "person-1", "--purpose", "T-TREAT", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output)
    assert out["allowed"] and out["documents_retrieved"] == 2 and out["responders"] == 2
    audit = runner.invoke(audit_list, ["--tenant", "acme", "--json"])
    rows = [json.loads(line) for line in audit.output.splitlines()]
    assert [r["decision"] for r in rows] == ["allowed", "refused"]
    key = dg.AssetKey(["network", "query_results"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(key, limit=10).records
        runs = instance.get_runs(dg.RunsFilter(job_name="network_query_job"))
    # both runs materialized the partition (a refusal is a green run that says so), newest first
    assert [r.partition_key for r in records] == [partition_key("acme", "sandbox-qhin")] * 2
    md = records[0].asset_materialization.metadata  # type: ignore[union-attr]
    assert md["allowed"].value == 1 and md["documents_retrieved"].value == 2
    assert records[1].asset_materialization.metadata["refused"].value == 1  # type: ignore[union-attr]
    assert out["run_id"] in {r.run_id for r in runs}
    assert all(set(r.tags.values()).isdisjoint({"person-1"}) for r in runs)  # no person in tags


def test_definitions_load_network_pattern() -> None:
    from medblocks_pipelines.definitions import defs

    d = defs()
    assert dg.AssetKey(["network", "query_results"]) in d.resolve_all_asset_keys()
    job = d.resolve_job_def("network_query_job")
    assert job.partitions_def is not None and job.partitions_def.name == "network_scopes"
    assert d.resolve_sensor_def("network_relationship_sensor").job_name == "network_query_job"


def test_cli_sync_fails_when_the_allowed_query_failed(env: Any, monkeypatch: Any) -> None:  # noqa: F811
    """Allowed, then failed before sending (no demographics anywhere): the run is red."""
    env.start()
    env.launch("person-9")  # a relationship, but no Patient landed for person-9
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(env.settings.data_dir))
    home = env.settings.data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(EMBEDDED_DAGSTER_YAML)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    res = CliRunner().invoke(
        network_sync, ["--tenant", "acme", "--person", "person-9", "--purpose", "T-TREAT"]
    )
    assert res.exit_code != 0
    assert isinstance(res.exception, MedblocksError)
    assert "every allowed network query failed" in str(res.exception)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(dg.RunsFilter(job_name="network_query_job"))
        assert run.status == dg.DagsterRunStatus.FAILURE
    assert [a.decision for a in env.cp.list_audit(tenant_id="acme")][-1] == "allowed"

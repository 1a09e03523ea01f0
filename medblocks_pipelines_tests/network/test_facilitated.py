"""Facilitated FHIR end to end over loopback: policy -> audit -> directory -> UDAP -> $match ->
US Core -> lake, against the strict UDAP sandbox.

Covers: an allowed T-TREAT query landing two nodes with provenance; a refused query that never
reaches a node and is audited; slow and down nodes giving a partial result within the deadline;
a node without $match (demographics search) and one without UDAP; T-IAS refused locally without an
id_token and allowed with one; registrations stored once and tokens reused across queries.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.network.tables import network_queries
from medblocks_pipelines.lib.network.udap.registration import RegistrationStore
from medblocks_pipelines.lib.network.udap.session import SHARED_TOKENS
from medblocks_pipelines.lib.registry import schema
from medblocks_pipelines_tests.network.udap_support import PERSON, UdapEnv, node_resources
from medblocks_sandbox.udap import NodeSpec


@pytest.fixture
def env(tmp_path: Any) -> Iterator[UdapEnv]:
    with contextlib.ExitStack() as stack:
        yield UdapEnv(tmp_path, stack)


def _seen(sb: Any) -> int:
    return sum(len(n.seen) for n in sb.nodes.values())


def test_allowed_query_lands_both_nodes_with_provenance(env: UdapEnv) -> None:
    env.start()
    env.launch()
    result = env.query()
    assert result.allowed and result.status == "success", result
    assert sorted(result.responders) == ["riverside-health", "valley-medical"]
    assert result.matched == 2 and result.transport == "facilitated_fhir"
    rows = env.lake("SELECT organization, resource_type, count(*) FROM lake GROUP BY ALL")
    by = {(r[0], r[1]): r[2] for r in rows}
    for org in ("riverside-health", "valley-medical"):
        for rtype in ("Patient", "Condition", "Observation", "AllergyIntolerance", "Encounter"):
            assert by.get((org, rtype), 0) >= 1, (org, rtype)
    # Only the matched patient, never the other patient each node holds.
    assert by[("riverside-health", "Patient")] == 1
    ids = {r[0] for r in env.lake("SELECT resource_id FROM lake WHERE resource_type='Patient'")}
    assert ids == {"rv-1", "vm-7"}
    assert env.lake("SELECT DISTINCT pattern, source FROM lake") == [("network", "sandbox-fhir")]
    audit = env.cp.list_audit(tenant_id="acme")[0]
    assert audit.decision == "allowed" and audit.evidence["transport"] == "facilitated_fhir"
    b2b = audit.evidence["hl7_b2b"]
    assert b2b["purpose_of_use"] == ["urn:oid:2.16.840.1.113883.3.7204.1.5.2.1#T-TREAT"]
    assert "NPI 1234567893" in b2b["organization_name"]  # Treatment XP: NPI in organization_name
    assert sorted(audit.responders) == ["riverside-health", "valley-medical"]
    with env.cp.engine.connect() as c:
        q = c.execute(sa.select(network_queries)).one()
    assert q.status == "success" and q.counts["node_status"] == {"ok": 2}
    assert {x["match_method"] for x in q.exchanges} == {"$match"}


def test_refused_query_never_leaves_and_is_audited(env: UdapEnv) -> None:
    sb = env.start()
    result = env.query()  # no relationship recorded
    assert not result.allowed and result.reason == "no_treatment_relationship"
    assert _seen(sb) == 0
    audit = env.cp.list_audit(tenant_id="acme")[0]
    assert audit.decision == "refused" and audit.evidence["transport"] == "facilitated_fhir"
    assert env.cp.list_pulls(tenant_id="acme") == []


def test_slow_and_down_nodes_give_a_partial_result(env: UdapEnv) -> None:
    specs = [
        NodeSpec("riverside-health", "Riverside", node_resources("rv-1")),
        NodeSpec("slow-node", "Slow", node_resources("sl-1"), fault="slow", delay_s=5.0),
        NodeSpec("down-node", "Down", node_resources("dn-1"), fault="down"),
    ]
    env.start(specs, timeout_s=2.0)
    env.launch()
    result = env.query()
    assert result.status == "partial", result
    assert result.gateway_status == {
        "riverside-health": "ok",
        "slow-node": "timeout",
        "down-node": "error",
    }
    orgs = {r[0] for r in env.lake("SELECT DISTINCT organization FROM lake")}
    assert orgs == {"riverside-health"}  # nothing of the slow node lands, even later
    assert result.as_metadata()["node_status"] == {"ok": 1, "timeout": 1, "error": 1}


def test_node_without_match_uses_search_and_node_without_udap_is_reported(env: UdapEnv) -> None:
    specs = [
        NodeSpec("riverside-health", "Riverside", node_resources("rv-1"), fault="no_match_op"),
        NodeSpec("legacy", "Legacy", node_resources("lg-1"), fault="no_udap"),
    ]
    env.start(specs)
    env.launch()
    result = env.query()
    assert result.gateway_status == {"riverside-health": "ok", "legacy": "no_udap"}
    assert result.nodes[0]["match_method"] == "search"
    assert result.resources_by_type.get("Condition", 0) >= 1


def test_ias_needs_an_id_token(env: UdapEnv) -> None:
    sb = env.start()
    cid = env.cp.create_connection(
        tenant_id="acme",
        pattern="patient_access",
        source_id="mercy",
        organization_id="acme-clinic",
        patient_ref=PERSON,
    )
    env.cp.transition(cid, "active")
    refused = env.query("T-IAS")
    assert not refused.allowed and refused.reason == "no_ial2_id_token"
    assert _seen(sb) == 0
    result = env.query("T-IAS", id_token="eyJ.ial2-claims-token.sig")
    assert result.allowed and result.status == "success", result
    assert all(n.auth.state.counts.get("token") == 1 for n in sb.nodes.values())


def test_registration_stored_once_and_tokens_reused(env: UdapEnv) -> None:
    sb = env.start()
    env.launch()
    SHARED_TOKENS._tokens.clear()
    env.query()
    env.query(retry_reason="more_results")
    for node in sb.nodes.values():
        assert node.auth.state.counts["registered"] == 1
        assert node.auth.state.counts["token"] == 1  # bound to (requestor, purpose): reused
    regs = RegistrationStore(env.cp.vault).list("sandbox-fhir")
    assert sorted(r.node for r in regs) == ["riverside-health", "valley-medical"]
    # Another purpose: a new registration (one XP per SAN URI) and a new token.
    env.query("T-TRTMNT")
    assert all(n.auth.state.counts["registered"] == 2 for n in sb.nodes.values())
    assert all(n.auth.state.counts["token"] == 2 for n in sb.nodes.values())


def test_asset_runs_facilitated_fhir_and_reports_node_status(env: UdapEnv) -> None:
    import dagster as dg

    from medblocks_pipelines.defs.network.assets import NetworkQueryConfig, network_query_results
    from medblocks_pipelines.defs.shared.resources import PlatformResource
    from medblocks_pipelines.lib.partitions import partition_key

    specs = [
        NodeSpec("riverside-health", "Riverside", node_resources("rv-1")),
        NodeSpec("down-node", "Down", node_resources("dn-1"), fault="down"),
    ]
    env.start(specs)
    env.launch()
    env.land_patient()
    key = partition_key("acme", "sandbox-fhir")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("network_scopes", [key])
        res = dg.materialize(
            [network_query_results],
            partition_key=key,
            instance=instance,
            resources={"platform": PlatformResource(data_dir=str(env.settings.data_dir))},
            run_config=dg.RunConfig(
                {
                    "network__query_results": NetworkQueryConfig(
                        persons=[PERSON, "stranger"], transport="fhir"
                    )
                }
            ),
        )
        assert res.success
        md: Any = res.get_asset_materialization_events()[0].materialization.metadata
    assert md["queries"].value == 2 and md["refused"].value == 1
    assert md["transport"].value == "fhir" and md["partial_queries"].value == 1
    assert md["node_status"].data == {"ok": 1, "error": 1}
    assert md["responders"].data == {"riverside-health": 1}
    assert md["resources_extracted"].value > 5


def test_node_requiring_consent_is_refused_per_node_and_tenant_policy_satisfies_it(
    env: UdapEnv,
) -> None:
    policy = "urn:oid:2.16.840.1.113883.3.7204.1.1.1.1.1"
    specs = [
        NodeSpec("riverside-health", "Riverside", node_resources("rv-1")),
        NodeSpec("strict-node", "Strict", node_resources("st-1"), consent_policy=policy),
    ]
    env.start(specs)
    env.launch()
    SHARED_TOKENS._tokens.clear()
    first = env.query()
    assert first.status == "partial"
    assert first.gateway_status == {"riverside-health": "ok", "strict-node": "refused"}
    assert first.errors == {"consent_required": 1}
    tenant = env.cp.get_tenant("acme")
    settings = dict(tenant.settings)
    settings["network"] = {**settings["network"], "consent_policy": [policy]}
    with env.cp.engine.begin() as conn:
        conn.execute(
            schema.tenants.update().where(schema.tenants.c.id == "acme").values(settings=settings)
        )
    second = env.query()
    assert second.status == "success", second.gateway_status


def test_leaky_node_never_lands_another_patients_records(env: UdapEnv) -> None:
    specs = [NodeSpec("riverside-health", "Riverside", node_resources("rv-1"), fault="leaky")]
    env.start(specs)
    env.launch()
    result = env.query()
    assert result.status == "success" and result.quarantined >= 1
    subjects = env.lake(
        "SELECT DISTINCT coalesce(json_extract_string(resource, '$.subject.reference'), "
        "json_extract_string(resource, '$.patient.reference')) FROM lake "
        "WHERE resource_type <> 'Patient'"
    )
    assert subjects == [("Patient/rv-1",)]

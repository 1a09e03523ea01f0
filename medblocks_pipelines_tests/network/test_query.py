"""End to end over real sockets: policy -> audit -> XCPD -> XCA -> retrieve -> C-CDA -> FHIR -> lake.

Covers: an allowed T-TREAT query landing records from two communities, a refused query without a
relationship that never reaches the gateway and is audited, T-IAS, T-TRTMNT repeats, no duplicate
retrieval, on-demand refresh, PDFs as DocumentReference + Binary, a gateway timing out while the
other answers.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.evidence import record_relationship_event
from medblocks_pipelines.lib.network.query import run_network_query
from medblocks_pipelines.lib.network.tables import network_documents, network_queries
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.warehouse.lake import resources_glob
from medblocks_sandbox.gateway import Behaviour, network_source_config

PERSON = "person-1"


class Env:
    """A control plane with one tenant, one EHR org, one network source pointing at a live gateway."""

    def __init__(
        self,
        tmp_path: Any,
        population: Any,
        signing_identity: tuple[bytes, bytes],
        gateway_server: Any,
    ) -> None:
        self.population, self.signing_identity, self.gateway_server = (
            population,
            signing_identity,
            gateway_server,
        )
        self.settings = get_settings(tmp_path / "data")
        self.settings.ensure_dirs()
        self.cp = open_control_plane(self.settings)
        self.cp.add_tenant(
            "acme",
            "Acme Care",
            settings={
                "network": {
                    "purposes": ["T-TREAT", "T-TRTMNT", "T-IAS"],
                    "organization": "acme-clinic",
                    "npi": "1234567893",
                }
            },
        )
        self.cp.add_source(
            "mercy",
            "Mercy EHR",
            "epic",
            "ehr",
            "http://127.0.0.1:1/fhir",
            ["clinician_workflow", "patient_access"],
        )
        self.cp.add_organization("acme-clinic", "acme", "mercy", "Acme Clinic")
        self.demo = ihe.Demographics.from_patient(population.resources_for("riverside-health")[0])
        self.gw = None

    def start(self, behaviours: dict[str, Behaviour] | None = None, timeout_s: float = 5.0) -> Any:
        self.gw = self.gateway_server(behaviours)
        cfg = network_source_config(self.gw.url, self.population, timeout_s=timeout_s)
        key, cert = self.signing_identity
        self.cp.vault.put("network/sandbox-qhin/key", key.decode(), tenant_id=None)
        self.cp.vault.put("network/sandbox-qhin/cert", cert.decode(), tenant_id=None)
        cfg["signing_key_secret"] = "network/sandbox-qhin/key"
        cfg["signing_cert_secret"] = "network/sandbox-qhin/cert"
        self.cp.add_source(
            "sandbox-qhin", "Sandbox QHIN", "sandbox", "network", None, ["network"], config=cfg
        )
        return self.gw

    def launch(self, person: str = PERSON) -> str:
        cid = self.cp.create_connection(
            tenant_id="acme",
            pattern="clinician_workflow",
            source_id="mercy",
            organization_id="acme-clinic",
            patient_ref=person,
        )
        self.cp.transition(cid, "active")
        return cid

    def query(self, purpose: str = "T-TREAT", **kw: Any) -> Any:
        return run_network_query(
            self.cp,
            self.settings,
            tenant="acme",
            person=kw.pop("person", PERSON),
            purpose=purpose,
            actor="dr-house",
            demographics=self.demo,
            **kw,
        )

    def lake(self, sql: str) -> list[tuple[Any, ...]]:
        glob = resources_glob(self.settings.lake_root, "acme")
        con = duckdb.connect()
        try:
            con.execute(
                f"CREATE VIEW lake AS SELECT * FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true)"
            )
            return con.execute(sql).fetchall()
        finally:
            con.close()


@pytest.fixture
def env(
    tmp_path: Any, population: Any, signing_identity: tuple[bytes, bytes], gateway_server: Any
) -> Any:
    """The environment on the embedded default (SQLite control plane)."""
    return Env(tmp_path, population, signing_identity, gateway_server)


def test_allowed_treatment_query_lands_two_communities(env: Any) -> None:
    env.start({"valley-medical": Behaviour(mtom=True, pdf=True)})
    env.launch()
    result = env.query()
    assert result.allowed and result.status == "success", result
    assert sorted(result.responders) == ["riverside-health", "valley-medical"]
    # riverside: 1 CCD; valley: 1 CCD + 1 PDF (MTOM)
    assert result.documents_retrieved == 3
    assert result.documents_stored_binary == 1
    rows = env.lake(
        "SELECT organization, resource_type, count(*) FROM lake GROUP BY ALL ORDER BY ALL"
    )
    orgs = {r[0] for r in rows}
    assert orgs == {"riverside-health", "valley-medical"}
    by = {(r[0], r[1]): r[2] for r in rows}
    for org in orgs:
        for rtype in (
            "Patient",
            "Condition",
            "AllergyIntolerance",
            "MedicationRequest",
            "Observation",
            "Immunization",
            "Procedure",
            "Encounter",
            "DocumentReference",
            "Binary",
            "Provenance",
        ):
            assert by.get((org, rtype), 0) >= 1, (org, rtype)
    assert by[("valley-medical", "DocumentReference")] == 2  # the CCD and the PDF
    assert env.lake("SELECT DISTINCT pattern, source FROM lake") == [("network", "sandbox-qhin")]
    # Audit: allowed, with evidence, gateways, responders and documents.
    audit = env.cp.list_audit(tenant_id="acme")[0]
    assert audit.decision == "allowed" and audit.purpose == "T-TREAT" and audit.actor == "dr-house"
    assert audit.evidence["relied_on"][0]["kind"] == "ehr_launch"
    assert sorted(audit.responders) == ["riverside-health", "valley-medical"]
    assert len(audit.documents) == 3
    # The responder saw our purpose of use in a signed assertion.
    assert {s["purpose"] for s in env.gw.seen} == {"T-TREAT"}
    with env.cp.engine.connect() as c:
        q = c.execute(sa.select(network_queries)).one()
    assert q.status == "success" and any(x["assertion"] for x in q.exchanges)


def test_refused_without_relationship_never_leaves_and_is_audited(env: Any) -> None:
    gw = env.start()
    result = env.query()
    assert not result.allowed and result.reason == "no_treatment_relationship"
    assert gw.seen == []  # the gateway saw nothing at all
    audit = env.cp.list_audit(tenant_id="acme")[0]
    assert audit.decision == "refused" and audit.reason == "no_treatment_relationship"
    assert audit.person_id == PERSON and audit.responders == []
    assert env.cp.list_pulls(tenant_id="acme") == []


def test_undeclared_purpose_refused(env: Any) -> None:
    gw = env.start()
    env.launch()
    result = env.query("T-PYMNT")
    assert not result.allowed and result.reason == "purpose_not_declared"
    assert gw.seen == []


def test_no_duplicate_retrieval(env: Any) -> None:
    env.start({"valley-medical": Behaviour(pdf=True)})
    env.launch()
    first = env.query()
    assert first.documents_retrieved == 3
    before = len([s for s in env.gw.seen if s["transaction"] == "ITI-39"])
    second = env.query()
    assert second.allowed and second.documents_retrieved == 0 and second.documents_skipped == 3
    after = len([s for s in env.gw.seen if s["transaction"] == "ITI-39"])
    assert after == before  # no retrieve request was sent the second time
    with env.cp.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(network_documents)).scalar() == 3


def test_on_demand_refetched_only_after_refresh(env: Any) -> None:
    env.start({"riverside-health": Behaviour(on_demand=True)})
    env.launch()
    first = env.query()
    assert first.documents_retrieved == 3  # riverside stable + on-demand, valley stable
    again = env.query()
    assert again.documents_retrieved == 0
    later = env.query(now=datetime.now(UTC) + timedelta(days=2))
    assert later.documents_retrieved == 1  # only the on-demand snapshot is fresh content


def test_gateway_timeout_others_still_answer(env: Any) -> None:
    env.start({"valley-medical": Behaviour(delay_s=1.5)}, timeout_s=0.4)
    env.launch()
    result = env.query()
    assert result.allowed and result.status == "partial"
    assert result.gateway_status == {"riverside-health": "ok", "valley-medical": "timeout"}
    assert result.responders == ["riverside-health"]
    assert result.documents_retrieved == 1
    assert env.lake("SELECT DISTINCT organization FROM lake") == [("riverside-health",)]
    pull = env.cp.list_pulls(tenant_id="acme")[0]
    assert pull.status == "partial"


def test_soap_fault_and_partial_success(env: Any) -> None:
    env.start(
        {
            "riverside-health": Behaviour(fault_on=frozenset({"ITI-38"})),
            "valley-medical": Behaviour(partial_success=True),
        }
    )
    env.launch()
    result = env.query()
    assert result.gateway_status["riverside-health"] == "fault"
    assert result.gateway_status["valley-medical"] == "partial"
    assert result.errors.get("SoapFault:env:Receiver") == 1
    assert result.errors.get("XDSRepositoryError") == 1
    assert result.documents_retrieved == 1 and result.status == "partial"


def test_ias_needs_verified_patient_access(env: Any) -> None:
    gw = env.start()
    env.launch()  # a clinician launch is not the patient's own connection
    refused = env.query("T-IAS")
    assert not refused.allowed and refused.reason == "no_verified_patient_access"
    cid = env.cp.create_connection(
        tenant_id="acme", pattern="patient_access", source_id="mercy", patient_ref=PERSON
    )
    pending = env.query("T-IAS")
    assert not pending.allowed  # pending: the patient has not finished authenticating
    env.cp.transition(cid, "active")
    allowed = env.query("T-IAS")
    assert allowed.allowed and allowed.documents_retrieved == 2
    assert {s["purpose"] for s in gw.seen} == {"T-IAS"}


def test_trtmnt_repeat_refused_until_new_event(env: Any) -> None:
    env.start()
    now = datetime.now(UTC)
    record_relationship_event(
        env.cp,
        tenant="acme",
        person=PERSON,
        kind="encounter",
        ref="enc-1",
        organization="acme-clinic",
        at=now - timedelta(days=1),
    )
    first = env.query("T-TRTMNT")
    assert first.allowed, first.reason
    repeat = env.query("T-TRTMNT")
    assert not repeat.allowed and repeat.reason == "repeat_without_new_event"
    retry = env.query("T-TRTMNT", retry_reason="technical_error")
    assert retry.allowed
    record_relationship_event(
        env.cp,
        tenant="acme",
        person=PERSON,
        kind="appointment",
        ref="appt-2",
        organization="acme-clinic",
        at=now + timedelta(days=3),
    )
    assert env.query("T-TRTMNT").allowed
    sweep = env.query("T-TRTMNT", trigger="sweep")
    assert not sweep.allowed and sweep.reason == "sweep_refused"
    refusals = [a for a in env.cp.list_audit(tenant_id="acme") if a.decision == "refused"]
    assert {a.reason for a in refusals} == {"repeat_without_new_event", "sweep_refused"}


def test_flawed_ccda_quarantines_with_reason(env: Any) -> None:
    env.start(
        {
            "riverside-health": Behaviour(
                flaws=frozenset({"null_codes", "missing_sections", "unknown_entry"})
            )
        }
    )
    env.launch()
    result = env.query()
    assert result.allowed and result.quarantined >= 2  # the code-less problem and the unknown entry
    glob = str(env.settings.lake_root / "quarantine" / "**" / "*.parquet")
    con = duckdb.connect()
    try:
        reasons = [
            r[0]
            for r in con.execute(
                f"SELECT reason FROM read_parquet('{glob}', union_by_name=true)"
            ).fetchall()
        ]
    finally:
        con.close()
    assert any("without a diagnosis code" in r for r in reasons), reasons
    assert any("unrecognised entry" in r for r in reasons), reasons


def test_trtmnt_query_carries_a_date_range(env: Any) -> None:
    env.start()
    record_relationship_event(
        env.cp,
        tenant="acme",
        person=PERSON,
        kind="encounter",
        ref="enc-5",
        organization="acme-clinic",
        at=datetime.now(UTC),
    )
    assert env.query("T-TRTMNT").allowed
    queries = [s for s in env.gw.seen if s["transaction"] == "ITI-38"]
    assert queries and all("$XDSDocumentEntryServiceStartTimeFrom" in s["slots"] for s in queries)
    env.launch()
    env.query("T-TREAT")  # T-TREAT has no such requirement
    treat = [s for s in env.gw.seen if s["transaction"] == "ITI-38" and s["purpose"] == "T-TREAT"]
    assert treat and all("$XDSDocumentEntryServiceStartTimeFrom" not in s["slots"] for s in treat)


def test_detected_issue_is_a_soft_no_match(env: Any) -> None:
    env.start({"valley-medical": Behaviour(detected_issue=True)})
    env.launch()
    result = env.query()
    assert result.gateway_status == {"riverside-health": "ok", "valley-medical": "no_match"}
    assert result.errors == {"DetectedIssue:PatientAddressRequested": 1}
    assert result.status == "success" and result.documents_retrieved == 1


def test_ias_demographics_double_check(env: Any) -> None:
    gw = env.start({"valley-medical": Behaviour(wrong_demographics=True)})
    cid = env.cp.create_connection(
        tenant_id="acme", pattern="patient_access", source_id="mercy", patient_ref=PERSON
    )
    env.cp.transition(cid, "active")
    result = env.query("T-IAS")
    assert result.gateway_status["valley-medical"] == "no_match"
    assert result.errors == {"DemographicsDoubleCheckFailed": 1}
    # The mismatched id was not kept: no query was sent to that community.
    assert not [s for s in gw.seen if s["org"] == "valley-medical" and s["transaction"] != "ITI-55"]
    # Treatment queries do not double-check (the same gateway's match is used).
    env.launch()
    treat = env.query("T-TREAT")
    assert treat.gateway_status["valley-medical"] == "ok"


def test_hostile_document_quarantined_others_land(env: Any) -> None:
    env.start({"riverside-health": Behaviour(hostile_document=True)})
    env.launch()
    result = env.query()
    assert result.allowed and result.documents_retrieved == 2 and result.quarantined == 1
    with env.cp.engine.connect() as c:
        rows = {r.organization: r.status for r in c.execute(sa.select(network_documents))}
    assert rows == {"riverside-health": "quarantined", "valley-medical": "converted"}
    assert env.lake("SELECT DISTINCT organization FROM lake") == [("valley-medical",)]


def test_document_of_another_patient_is_quarantined(env: Any) -> None:
    """A community returns another patient's CCD: nothing of it lands under our person."""
    env.start({"riverside-health": Behaviour(foreign_document=True)})
    env.launch()
    result = env.query()
    assert result.allowed and result.quarantined >= 1
    riverside = env.lake(
        "SELECT DISTINCT resource_type FROM lake WHERE organization = 'riverside-health'"
    )
    assert riverside == [("Binary",)]  # the source document itself, no patient data
    glob = str(env.settings.lake_root / "quarantine" / "**" / "*.parquet")
    with duckdb.connect() as con:
        reasons = con.execute(
            f"SELECT DISTINCT split_part(reason, ':', 1) FROM read_parquet('{glob}', "
            "union_by_name=true) WHERE organization = 'riverside-health'"
        ).fetchall()
    assert reasons == [("outside_patient_compartment",)]
    valley = env.lake("SELECT count(*) FROM lake WHERE organization = 'valley-medical'")
    assert valley[0][0] > 1


def test_warehouse_build_shows_both_communities(env: Any) -> None:
    """What the demo shows: network records from two organizations in the tenant's warehouse,
    the same fact from repeated CCDs once per community."""
    from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse

    env.start({"riverside-health": Behaviour(on_demand=True)})
    env.launch()
    env.query()
    env.query(
        now=datetime.now(UTC) + timedelta(days=2)
    )  # a second, on-demand CCD with the same facts
    build_warehouse("acme", settings=env.settings, control_plane=env.cp, steps=[])
    con = open_warehouse("acme", settings=env.settings)
    try:
        rows = con.execute(
            "SELECT organization, count(*) FROM resources WHERE pattern = 'network' "
            "AND resource_type = 'Condition' GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    finally:
        con.close()
    # 3 conditions per community: each fact once, although riverside sent it in two CCDs.
    assert rows == [("riverside-health", 3), ("valley-medical", 3)]


@pytest.mark.postgres
def test_allowed_and_refused_on_postgres(
    tmp_path: Any, population: Any, signing_identity: Any, gateway_server: Any, monkeypatch: Any
) -> None:
    """The same code path on PostgreSQL: the network tables, audit and registry."""
    from medblocks_pipelines_tests.conftest import fresh_pg_database

    with fresh_pg_database("network") as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        e = Env(tmp_path, population, signing_identity, gateway_server)
        try:
            e.start()
            refused = e.query()
            assert not refused.allowed and e.gw.seen == []
            e.launch()
            first = e.query()
            assert first.allowed and first.documents_retrieved == 2
            assert e.query().documents_skipped == 2
            reasons = [a.reason for a in e.cp.list_audit(tenant_id="acme")]
            assert reasons == ["ok", "ok", "no_treatment_relationship"]
        finally:
            e.cp.engine.dispose()


def test_person_from_the_unified_record(env: Any, population: Any) -> None:
    """A warehouse person id works: its linked source patient's EHR launch is the relationship and
    its Patient gives the demographics (no demographics passed in)."""
    import json as _json

    from medblocks_pipelines.lib.warehouse.build import warehouse_path

    env.start()
    env.launch("ehr-patient-42")  # the launch knows the EHR's patient id, not the person id
    patient = dict(population.resources_for("riverside-health")[0], id="ehr-patient-42")
    path = warehouse_path(env.settings, "acme")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE TABLE patient_links (patient_key VARCHAR, person_id VARCHAR)")
        con.execute(
            "INSERT INTO patient_links VALUES ('mercy/Patient/ehr-patient-42', 'person-xyz')"
        )
        con.execute(
            "CREATE TABLE resources (resource_key VARCHAR, resource_type VARCHAR, resource_id VARCHAR, "
            "resource VARCHAR, pattern VARCHAR, fetched_at TIMESTAMP)"
        )
        con.execute(
            "INSERT INTO resources VALUES ('mercy/Patient/ehr-patient-42', 'Patient', 'ehr-patient-42', ?, "
            "'clinician_workflow', now())",
            [_json.dumps(patient)],
        )
    finally:
        con.close()
    result = run_network_query(
        env.cp,
        env.settings,
        tenant="acme",
        person="person-xyz",
        purpose="T-TREAT",
        actor="dr-house",
    )
    assert result.allowed and result.documents_retrieved == 2, result
    assert env.cp.list_audit(tenant_id="acme")[0].person_id == "person-xyz"
    # Without the link, the same person id has no relationship.
    refused = run_network_query(
        env.cp,
        env.settings,
        tenant="acme",
        person="person-other",
        purpose="T-TREAT",
        actor="dr-house",
    )
    assert not refused.allowed and refused.reason == "no_treatment_relationship"


def test_busy_registry_and_repository_are_retried(env: Any) -> None:
    env.start({"riverside-health": Behaviour(busy_first=frozenset({"ITI-38", "ITI-39"}))})
    env.launch()
    result = env.query()
    assert result.status == "success" and result.documents_retrieved == 2
    assert result.errors == {"Retried:XDSRegistryBusy": 1, "Retried:XDSRepositoryBusy": 1}
    tx = [s["transaction"] for s in env.gw.seen if s["org"] == "riverside-health"]
    assert tx == ["ITI-55", "ITI-38", "ITI-38", "ITI-39", "ITI-39"]
    audit = env.cp.list_audit(tenant_id="acme")[0]
    assert audit.evidence["requestor"] == {
        "actor": "dr-house",
        "organization": "acme-clinic",
        "npi": "1234567893",
    }

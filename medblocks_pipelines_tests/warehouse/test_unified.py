"""The unified record: facts deduplicated across sources against the generator's fact ledger,
provenance, tombstones, code normalisation, and the whole build's tables."""

import json
from collections import defaultdict

import duckdb
import pytest

from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_pipelines.lib.warehouse.unified import KIND_VIEWS, fact_pairs
from medblocks_pipelines_tests.warehouse.conftest import PATTERN_OF_ORG, TENANT, Built


def _truth_groups(built: Built) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for fact, org, rtype, rid in built.pop.fact_truth:
        groups[fact].add(f"{org}/{rtype}/{rid}")
    return groups


def test_fact_dedup_pairwise_precision_and_recall(
    built: Built, wh: duckdb.DuckDBPyConnection
) -> None:
    truth = _truth_groups(built)
    known = {k for g in truth.values() for k in g}
    pred: dict[str, set[str]] = defaultdict(set)
    for fact_id, key in wh.execute("SELECT fact_id, resource_key FROM fact_sources").fetchall():
        if key in known:
            pred[fact_id].add(key)
    true_pairs, pred_pairs = fact_pairs(truth.values()), fact_pairs(pred.values())
    assert len(true_pairs) > 500
    tp = len(true_pairs & pred_pairs)
    assert tp / len(pred_pairs) >= 0.99
    assert tp / len(true_pairs) >= 0.95


def test_a_condition_from_ehr_claim_and_network_is_one_fact(
    built: Built, wh: duckdb.DuckDBPyConnection
) -> None:
    truth = _truth_groups(built)
    kinds = {org: PATTERN_OF_ORG[org] for org in PATTERN_OF_ORG}
    three_way = [
        keys
        for fact, keys in truth.items()
        if "/cond/" in fact
        and {kinds[k.split("/")[0]] for k in keys} >= {"backend", "patient_access", "network"}
    ]
    assert three_way, "the population should hold a condition seen by EHR, payer and network"
    keys = sorted(three_way[0])
    clinical = [k for k in keys if "/ExplanationOfBenefit/" not in k]
    rows = wh.execute(
        "SELECT DISTINCT fact_id FROM fact_sources WHERE resource_key IN "
        f"({', '.join('?' for _ in clinical)})",
        clinical,
    ).fetchall()
    assert len(rows) == 1  # the EHR's and the network's conditions are one fact
    claims = {k for k in keys if "/ExplanationOfBenefit/" in k}
    linked = {
        r[0]
        for r in wh.execute(
            "SELECT resource_key FROM fact_sources WHERE fact_id = ? AND element LIKE 'diagnosis%'",
            [rows[0][0]],
        ).fetchall()
    }
    assert linked == claims  # and every claim that billed it is linked to that fact
    fact = wh.execute(
        "SELECT kind, n_sources, patterns, from_claims, from_clinical, code_system FROM facts "
        "WHERE fact_id = ?",
        [rows[0][0]],
    ).fetchone()
    assert fact is not None
    kind, n_sources, patterns, from_claims, from_clinical, system = fact
    assert kind == "condition" and n_sources >= 3 and from_claims and from_clinical
    assert {"backend", "patient_access", "network"} <= set(patterns)
    assert system == "http://snomed.info/sct"  # the clinical code system is preferred for display


def test_every_mention_is_reachable(wh: duckdb.DuckDBPyConnection) -> None:
    mentions = wh.execute("SELECT count(*) FROM fact_mentions").fetchone()
    sources = wh.execute("SELECT count(*) FROM fact_sources").fetchone()
    unmatched = wh.execute("SELECT count(*) FROM fact_mentions WHERE fact_id IS NULL").fetchone()
    assert mentions and sources and unmatched is not None
    assert mentions[0] == sources[0] + unmatched[0]
    # every clinical resource of a fact type is a mention
    n = wh.execute(
        "SELECT count(*) FROM resources WHERE resource_type IN ('Condition', 'Observation', "
        "'Encounter', 'Immunization', 'Procedure', 'MedicationRequest', 'AllergyIntolerance', "
        "'DiagnosticReport')"
    ).fetchone()
    m = wh.execute(
        "SELECT count(DISTINCT resource_key) FROM fact_mentions WHERE NOT is_claim"
    ).fetchone()
    assert n and m and n[0] == m[0]


def test_every_fact_has_a_person_and_a_source(wh: duckdb.DuckDBPyConnection) -> None:
    row = wh.execute(
        "SELECT count(*) FILTER (WHERE person_id IS NULL), "
        "count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM fact_sources s "
        "WHERE s.fact_id = facts.fact_id)) FROM facts"
    ).fetchone()
    assert row == (0, 0)


@pytest.mark.parametrize("kind", sorted(KIND_VIEWS))
def test_kind_views_partition_facts(wh: duckdb.DuckDBPyConnection, kind: str) -> None:
    view = KIND_VIEWS[kind]
    n = wh.execute(f"SELECT count(*) FROM {view}").fetchone()
    m = wh.execute("SELECT count(*) FROM facts WHERE kind = ?", [kind]).fetchone()
    assert n == m and n is not None and n[0] > 0


def test_view_tables_carry_provenance(wh: duckdb.DuckDBPyConnection) -> None:
    views = [r[0] for r in wh.execute("SELECT view FROM view_tables").fetchall()]
    assert {"patient", "condition", "observation", "explanation_of_benefit"} <= set(views)
    cols = {r[0] for r in wh.execute("DESCRIBE condition").fetchall()}
    assert {
        "tenant",
        "pattern",
        "source",
        "organization",
        "connection",
        "resource_key",
        "fetched_at",
    } <= cols
    assert wh.execute("SELECT count(*) FROM view_errors").fetchone() == (0,)
    # The build's views carry each decimal's exact text beside its DECIMAL(38,18) column.
    obs = {r[0]: r[1] for r in wh.execute("DESCRIBE observation").fetchall()}
    decimals = [c for c, t in obs.items() if t.startswith("DECIMAL")]
    assert decimals and all(obs.get(f"{c}_text") == "VARCHAR" for c in decimals)
    exact = wh.execute(
        f"SELECT count(*) FROM observation WHERE {decimals[0]} IS NOT NULL AND "
        f"CAST({decimals[0]}_text AS DECIMAL(38,18)) <> {decimals[0]}"
    ).fetchone()
    assert exact == (0,)


def _minimal(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[dict[str, object]]]:
    settings = get_settings(tmp_path_factory.mktemp("mini") / "data")
    settings.ensure_dirs()
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Lee", "given": ["Ann"]}],
        "gender": "female",
        "birthDate": "1970-01-02",
    }
    cond = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "category": [{"coding": [{"code": "problem-list-item"}]}],
        "code": {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"},
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"},
            ]
        },
        "onsetDateTime": "2020-01-01",
    }
    claim = {
        "resourceType": "ExplanationOfBenefit",
        "id": "e1",
        "status": "active",
        "type": {"coding": [{"code": "professional"}]},
        "use": "claim",
        "patient": {"reference": "Patient/p1"},
        "created": "2024-03-05",
        "insurer": {"reference": "Organization/payer"},
        "provider": {"reference": "Practitioner/d1"},
        "outcome": "complete",
        "insurance": [{"focal": True, "coverage": {"reference": "Coverage/cv1"}}],
        "billablePeriod": {"start": "2024-03-01"},
        # the payer sends the ICD-10-CM code without its dot and through the OID
        "diagnosis": [
            {
                "sequence": 1,
                "diagnosisCodeableConcept": {
                    "coding": [{"system": "urn:oid:2.16.840.1.113883.6.90", "code": "E119"}]
                },
            }
        ],
        "item": [
            {
                "sequence": 1,
                "productOrService": {
                    "coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]
                },
            },
            {
                "sequence": 2,
                "productOrService": {
                    "coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "90686"}]
                },
                "servicedDate": "2024-03-01",
            },
        ],
    }
    imm = {
        "resourceType": "Immunization",
        "id": "i1",
        "patient": {"reference": "Patient/p1"},
        "status": "completed",
        "occurrenceDateTime": "2024-03-01T10:00:00-08:00",
        "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "150"}]},
    }
    enc = {
        "resourceType": "Encounter",
        "id": "n1",
        "subject": {"reference": "Patient/p1"},
        "status": "finished",
        "class": {"code": "AMB"},
        "period": {"start": "2024-03-01T09:30:00-08:00"},
        "type": [
            {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "185345009"},
                    {"system": "http://www.ama-assn.org/go/cpt", "code": "99213"},
                ]
            }
        ],
    }
    return settings, [
        {"source": "ehr", "pattern": "backend", "resources": [patient, cond, imm, enc]},
        {
            "source": "payer",
            "pattern": "patient_access",
            "resources": [
                {**patient, "id": "m1"},
                {**claim, "patient": {"reference": "Patient/m1"}},
            ],
        },
    ]


def _land(settings: object, batches: list[dict[str, object]], run_id: str) -> None:
    for b in batches:
        prov = Provenance(
            TENANT, str(b["pattern"]), str(b["source"]), str(b["source"]), None, run_id
        )
        with LakeWriter(settings.lake_root, prov) as w:  # type: ignore[attr-defined]
            for r in b["resources"]:  # type: ignore[attr-defined]
                w.add(json.dumps(r))


def test_claim_codes_meet_clinical_codes_and_tombstones_flow_through(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    settings, batches = _minimal(tmp_path_factory)
    _land(settings, batches, "run-1")
    res = build_warehouse(TENANT, settings=settings)  # type: ignore[arg-type]
    with duckdb.connect(str(res.path), read_only=True) as con:
        facts = dict(
            con.execute(
                "SELECT kind, n_sources FROM facts WHERE kind IN "
                "('condition', 'immunization', 'encounter')"
            ).fetchall()
        )
        assert facts == {"condition": 2, "immunization": 2, "encounter": 2}
        assert con.execute("SELECT count(*) FROM persons").fetchone() == (1,)
    # the EHR retracts the condition: the claim still states it, the fact stays with one source
    prov = Provenance(TENANT, "backend", "ehr", "ehr", None, "run-2")
    with LakeWriter(settings.lake_root, prov) as w:  # type: ignore[attr-defined]
        w.add_tombstone("Condition", "c1")
    res = build_warehouse(TENANT, settings=settings)  # type: ignore[arg-type]
    with duckdb.connect(str(res.path), read_only=True) as con:
        row = con.execute(
            "SELECT n_sources, sources FROM facts WHERE kind = 'condition'"
        ).fetchone()
        assert row == (1, ["payer"])
    # the payer retracts the claim: no source states the condition any more
    prov = Provenance(TENANT, "patient_access", "payer", "payer", None, "run-3")
    with LakeWriter(settings.lake_root, prov) as w:  # type: ignore[attr-defined]
        w.add_tombstone("ExplanationOfBenefit", "e1")
    res = build_warehouse(TENANT, settings=settings)  # type: ignore[arg-type]
    with duckdb.connect(str(res.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM facts WHERE kind = 'condition'").fetchone() == (0,)
        assert con.execute(
            "SELECT count(*) FROM fact_sources WHERE resource_key LIKE 'payer/%'"
        ).fetchone() == (0,)


def test_rebuild_is_idempotent(built: Built, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Building again from the same lake gives the same facts and persons (ids included)."""
    again = build_warehouse(TENANT, settings=built.settings)
    with duckdb.connect(str(again.path), read_only=True) as con:
        facts = con.execute("SELECT fact_id, n_sources FROM facts ORDER BY fact_id").fetchall()
        persons = con.execute("SELECT person_id FROM persons ORDER BY 1").fetchall()
    with built.connect() as old:
        assert (
            facts == old.execute("SELECT fact_id, n_sources FROM facts ORDER BY fact_id").fetchall()
        )
        assert persons == old.execute("SELECT person_id FROM persons ORDER BY 1").fetchall()


def test_network_facts_merge_the_same_after_ccda_conversion(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The network pattern lands FHIR converted from C-CDA: its facts merge with the EHR's and the
    payer's as the network organizations' own FHIR would (conditions, immunizations, results,
    medications, procedures)."""
    from medblocks_pipelines.lib.network.ccda import SourceDocument, convert_ccda
    from medblocks_sandbox.gateway.community import _load
    from medblocks_sandbox.gateway.render import render_ccd
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    pop = generate_population(PopulationSpec(seed=11, persons=15))

    def build(via_ccda: bool) -> dict[str, int]:
        settings = get_settings(tmp_path_factory.mktemp("ccda") / "data")
        settings.ensure_dirs()
        for org in pop.organizations:
            if org.kind == "network" and via_ccda:
                continue
            network = PATTERN_OF_ORG[org.id] == "network"
            prov = Provenance(
                TENANT,
                PATTERN_OF_ORG[org.id],
                org.id,
                org.id,
                None,
                "r1",
                "T-TREAT" if network else None,
                "q1" if network else None,
            )
            with LakeWriter(settings.lake_root, prov) as w:
                for r in pop.resources_for(org.id):
                    w.add(json.dumps(r))
        if via_ccda:
            for com in _load(pop, None).values():
                prov = Provenance(
                    TENANT, "network", com.org.id, com.org.id, None, "r1", "T-TREAT", "q1"
                )
                with LakeWriter(settings.lake_root, prov) as w:
                    for pid, patient in com.patients.items():
                        uid = com.doc_uid(pid, "ccd")
                        xml = render_ccd(
                            patient,
                            com.resources.get(pid, []),
                            org={"name": com.org.name, "oid": com.oid},
                            document_id=uid,
                        )
                        doc = convert_ccda(xml, SourceDocument(com.hcid, com.repository, uid))
                        for r in doc.resources:
                            w.add(json.dumps(r))
        res = build_warehouse(TENANT, settings=settings)
        with duckdb.connect(str(res.path), read_only=True) as con:
            rows = con.execute(
                "SELECT kind, count(*) FROM facts WHERE list_contains(patterns, 'network') "
                "AND len(patterns) > 1 GROUP BY 1"
            ).fetchall()
            persons = con.execute("SELECT count(*) FROM persons WHERE n_patterns >= 3").fetchone()
        out = {str(k): int(n) for k, n in rows}
        out["persons_3_patterns"] = int(persons[0]) if persons else 0
        return out

    raw, converted = build(False), build(True)
    for kind in ("condition", "immunization", "result", "medication", "procedure"):
        assert raw.get(kind, 0) > 0 or kind in ("medication", "procedure")
        assert converted.get(kind, 0) >= 0.9 * raw.get(kind, 0), (kind, raw, converted)
    assert converted["persons_3_patterns"] == raw["persons_3_patterns"] > 0


def test_odd_shapes_neither_crash_nor_vanish(tmp_path_factory: pytest.TempPathFactory) -> None:
    """JSON that is valid but not shaped as expected (strings for lists, numbers for dates,
    absolute references, undated events) is carried as mentions, never dropped."""
    settings = get_settings(tmp_path_factory.mktemp("odd") / "data")
    settings.ensure_dirs()
    odd = [
        {
            "resourceType": "Patient",
            "id": "w1",
            "name": "Bob",
            "birthDate": 123,
            "telecom": {"system": "phone"},
            "identifier": "x",
        },
        {
            "resourceType": "Patient",
            "id": "w2",
            "name": [{"given": "Ann", "family": ["Lee"]}],
            "gender": 5,
            "birthDate": "19-01-01",
        },
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": "Patient/w1",
            "code": "abc",
            "onsetDateTime": 20200101,
        },
        {
            "resourceType": "Condition",
            "id": "c2",
            "subject": {"reference": "https://x.example/fhir/Patient/w2"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
        },
        {
            "resourceType": "Observation",
            "id": "o1",
            "subject": {"reference": "Patient/w2"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "1-1"}]},
            "valueQuantity": {"value": "abc"},
            "component": "x",
        },
        {
            "resourceType": "ExplanationOfBenefit",
            "id": "e1",
            "patient": {"reference": "Patient/w2"},
            "diagnosis": {"x": 1},
            "item": [{"productOrService": "x"}],
        },
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "subject": {"reference": "Patient/w2"},
            "medicationReference": {"reference": "Medication/none"},
        },
        {"resourceType": "Encounter", "id": "n1", "subject": {"reference": "Group/g1"}},
    ]
    with LakeWriter(
        settings.lake_root, Provenance(TENANT, "backend", "src", "org", None, "r")
    ) as w:
        # Landed without the FHIR checks at the door (as in a lake landed before them): the
        # steps must survive such rows whatever the landing lets through.
        w.validate = False
        for r in odd:
            w.add(json.dumps(r))
    res = build_warehouse(TENANT, settings=settings)
    with duckdb.connect(str(res.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM patient_links").fetchone() == (2,)
        rows = dict(con.execute("SELECT mention_id, person_id FROM fact_mentions").fetchall())
    assert set(rows) == {
        "src/Condition/c1",
        "src/Condition/c2",
        "src/Observation/o1",
        "src/MedicationRequest/m1",
        "src/ExplanationOfBenefit/e1#billablePeriod",
        "src/Encounter/n1",
    }
    assert rows["src/Condition/c2"] is not None  # an absolute reference still finds its patient
    assert rows["src/Encounter/n1"] is None  # a Group subject is no person: kept, not matched


def test_a_resource_landed_through_two_patterns_counts_both(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same EHR read by backend sync and through a patient's portal connection is one resource
    (one resource_key), but the person and the fact remember both patterns."""
    settings = get_settings(tmp_path_factory.mktemp("two") / "data")
    settings.ensure_dirs()
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Lee", "given": ["Ann"]}],
        "birthDate": "1970-01-02",
    }
    allergy = {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "patient": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "762952008"}]},
    }
    for pattern, conn in (("backend", None), ("patient_access", "c1")):
        with LakeWriter(
            settings.lake_root, Provenance(TENANT, pattern, "ehr", "org", conn, pattern)
        ) as w:
            w.add(json.dumps(patient))
            w.add(json.dumps(allergy))
    res = build_warehouse(TENANT, settings=settings)
    with duckdb.connect(str(res.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM resources").fetchone() == (2,)
        assert con.execute("SELECT patterns, n_patterns FROM persons").fetchone() == (
            ["backend", "patient_access"],
            2,
        )
        assert con.execute("SELECT patterns FROM facts").fetchone() == (
            ["backend", "patient_access"],
        )
        assert con.execute("SELECT patterns_seen FROM fact_sources").fetchone() == (
            ["backend", "patient_access"],
        )

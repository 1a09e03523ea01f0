"""C-CDA R2.1 -> FHIR R4: each domain, SPECS 6.3 rules, flaws (nullFlavors, missing sections,
unknown entries), R4 validity (fhir.resources R4B models) and deterministic ids for de-duplication."""

from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from medblocks_pipelines.lib.network.ccda import SourceDocument, convert_ccda
from medblocks_pipelines.lib.network.ccda.common import Flags, ts_to_fhir
from medblocks_pipelines_tests.network.fixtures import ORG, patient_bundle
from medblocks_sandbox.gateway.render import render_ccd

SRC = SourceDocument(
    "urn:oid:2.16.840.1.113883.3.9999.4",
    "2.16.840.1.113883.3.9999.4.2",
    "2.16.840.1.113883.3.9999.4.9.1",
    organization="riverside-health",
)


def _convert(
    flaws: frozenset[str] = frozenset(), doc_id: str = "2.16.840.1.113883.3.9999.4.9.1"
) -> Any:
    patient, res = patient_bundle()
    xml = render_ccd(patient, res, org=ORG, document_id=doc_id, flaws=flaws)
    return convert_ccda(xml, SRC)


def _by_type(result: Any, rtype: str) -> list[dict[str, Any]]:
    return [r for r in result.resources if r["resourceType"] == rtype]


@pytest.mark.parametrize(
    "ts,expected",
    [
        ("2023", "2023"),  # year precision kept
        ("202305", "2023-05"),  # month precision kept
        ("20230531", "2023-05-31"),  # a date stays a date, never midnight UTC
        ("20230531143000-0500", "2023-05-31T14:30:00-05:00"),  # full time with offset
        ("202305311430+0100", "2023-05-31T14:30:00+01:00"),  # minutes only: seconds filled
        ("20231399", None),  # invalid month
    ],
)
def test_dates_keep_precision(ts: str, expected: str | None) -> None:
    assert ts_to_fhir(ts, default_tz=None, flags=Flags()) == expected


def test_time_without_offset_uses_document_offset_or_drops_time() -> None:
    flags = Flags()
    assert (
        ts_to_fhir("20230531143000", default_tz="+0200", flags=flags) == "2023-05-31T14:30:00+02:00"
    )
    assert ts_to_fhir("20230531143000", default_tz=None, flags=flags) == "2023-05-31"
    assert flags.counts == {"time_without_zone": 1, "time_zone_from_document": 1}


def test_every_domain_converted_and_valid_r4() -> None:
    result = _convert()
    counts = result.counts_by_type()
    for rtype in (
        "Patient",
        "Condition",
        "AllergyIntolerance",
        "MedicationRequest",
        "Observation",
        "DiagnosticReport",
        "Immunization",
        "Procedure",
        "Encounter",
        "DocumentReference",
        "Provenance",
    ):
        assert counts.get(rtype, 0) >= 1, rtype
    assert result.quarantined == []
    for res in result.resources:
        get_fhir_model_class(res["resourceType"]).model_validate(res)


def test_problem_rules() -> None:
    conds = {c["code"]["coding"][0]["code"]: c for c in _by_type(_convert(), "Condition")}
    dm = conds["44054006"]  # diagnosis comes from observation/value, not observation/code
    assert dm["code"]["coding"][1] == {
        "code": "E11.9",
        "system": "http://hl7.org/fhir/sid/icd-10-cm",
    }
    assert dm["code"]["text"] == "Type 2 diabetes"  # originalText resolved from the narrative
    assert dm["onsetDateTime"] == "2019-03" and dm["recordedDate"] == "2019-03-15"
    assert (
        dm["clinicalStatus"]["coding"][0]["code"] == "active"
    )  # from the Problem Status observation
    assert dm["category"][0]["coding"][0]["code"] == "problem-list-item"
    resolved = conds["195662009"]
    assert resolved["clinicalStatus"]["coding"][0]["code"] == "resolved"
    assert resolved["abatementDateTime"] == "2024-01-20"
    dx = conds["38341003"]  # from the Encounters section: an encounter diagnosis
    assert dx["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    enc = _by_type(_convert(), "Encounter")[0]
    assert enc["diagnosis"][0]["condition"]["reference"] == f"Condition/{dx['id']}"
    assert all(
        c["meta"]["source"] == "urn:oid:2.16.840.1.113883.3.9999.4.9.1" for c in conds.values()
    )


def test_vitals_bp_pair_becomes_one_panel() -> None:
    obs = _by_type(_convert(), "Observation")
    bp = [o for o in obs if o["code"]["coding"][0]["code"] == "85354-9"]
    assert len(bp) == 1
    assert [c["code"]["coding"][0]["code"] for c in bp[0]["component"]] == ["8480-6", "8462-4"]
    assert bp[0]["component"][0]["valueQuantity"]["value"] == 142
    assert not [o for o in obs if o["code"]["coding"][0]["code"] in ("8480-6", "8462-4")]


def test_allergy_medication_immunization_details() -> None:
    r = _convert()
    allergy = _by_type(r, "AllergyIntolerance")[0]
    assert allergy["code"]["coding"][0]["code"] == "7980" and allergy["category"] == ["medication"]
    assert allergy["reaction"][0]["severity"] == "moderate" and allergy["criticality"] == "high"
    med = _by_type(r, "MedicationRequest")[0]
    assert med["dosageInstruction"][0]["timing"]["repeat"]["period"] == 12.0
    imm = _by_type(r, "Immunization")[0]
    assert imm["occurrenceDateTime"] == "2024-10-02" and imm["lotNumber"] == "LOT123"


def test_ids_stable_across_documents() -> None:
    # The same facts in two different CCDs (new document id) land as the same resources.
    a = {
        r["id"]
        for r in _convert().resources
        if r["resourceType"] not in ("DocumentReference", "Provenance")
    }
    b = {
        r["id"]
        for r in _convert(doc_id="2.16.840.1.113883.3.9999.4.9.2").resources
        if r["resourceType"] not in ("DocumentReference", "Provenance")
    }
    assert a == b and len(a) > 10


def test_null_flavors_missing_sections_unknown_entries() -> None:
    r = _convert(frozenset({"null_codes", "missing_sections", "unknown_entry"}))
    reasons = sorted(q.reason for q in r.quarantined)
    assert reasons == [
        "problem observation without a diagnosis code or text",
        "unrecognised entry in problem section",
    ]
    # nullFlavor="OTH" root with a translation: converted from the translation, not dropped.
    conds = _by_type(r, "Condition")
    dm = [
        c
        for c in conds
        if {x["code"] for x in c["code"].get("coding", [])} == {"44054006", "E11.9"}
    ]
    assert len(dm) == 1 and dm[0]["code"]["text"] == "Type 2 diabetes"
    assert r.flags.counts.get("section_missing_immunizations") == 1
    assert r.flags.counts.get("section_missing_procedures") == 1
    for res in r.resources:
        get_fhir_model_class(res["resourceType"]).model_validate(res)


def test_no_known_allergies_and_empty_sections() -> None:
    patient, _ = patient_bundle()
    r = convert_ccda(render_ccd(patient, [], org=ORG, document_id="1.2.3.4"), SRC)
    allergies = _by_type(r, "AllergyIntolerance")
    assert (
        allergies[0]["code"]["coding"][0]["code"] == "716186003"
    )  # mapping IG's "no known allergy"
    assert r.flags.counts.get("section_empty_problems") == 1
    assert r.quarantined == []


def test_times_without_offset_flagged() -> None:
    r = _convert(frozenset({"no_tz"}))
    assert r.flags.counts.get("time_without_zone", 0) == 0  # the document's own offset is used
    assert r.flags.counts["time_zone_from_document"] > 0  # ...and flagged
    enc = _by_type(r, "Encounter")[0]
    assert enc["period"]["start"] == "2025-06-01T09:00:00+00:00"


def test_not_a_clinical_document() -> None:
    with pytest.raises(ValueError, match="ClinicalDocument"):
        convert_ccda(b"<x xmlns='urn:hl7-org:v3'/>", SRC)


def test_entries_without_ids_get_document_scoped_ids() -> None:
    from lxml import etree

    patient, res = patient_bundle()
    xml = render_ccd(patient, res, org=ORG, document_id="1.2.3.9")
    root = etree.fromstring(xml)
    proc = root.find(".//{urn:hl7-org:v3}procedure")
    for i in proc.findall("{urn:hl7-org:v3}id"):
        proc.remove(i)
    stripped = etree.tostring(root)
    other = SourceDocument(SRC.home_community_id, SRC.repository_unique_id, "1.2.3.10")
    a, b, c = (
        convert_ccda(stripped, SRC),
        convert_ccda(stripped, SRC),
        convert_ccda(stripped, other),
    )
    pa, pb, pc = (_by_type(x, "Procedure")[0] for x in (a, b, c))
    assert pa["id"] == pb["id"] != pc["id"]  # stable for the document, not across documents
    assert "identifier" not in pa and a.flags.counts["entry_without_id"] == 1

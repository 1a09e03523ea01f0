"""Shape of a generated world: organizations, FHIR R4 validity (R4B models), US Core / CARIN BB
details, references that resolve, and clinical coherence of what is generated."""

import base64
import importlib
import re
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from medblocks_sandbox.errors import GeneratorError
from medblocks_sandbox.generator import Population, PopulationSpec, generate_population
from medblocks_sandbox.generator.people import npi_check_digit

EHR_TYPES = {
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "DiagnosticReport",
    "DocumentReference",
    "Binary",
    "Practitioner",
    "Organization",
    "Location",
}
PAYER_TYPES = {"Patient", "Coverage", "ExplanationOfBenefit", "Organization", "Practitioner"}
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _model(rtype: str) -> Any:
    return getattr(importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}"), rtype)


def _refs(node: Any) -> list[str]:
    """Every literal `reference` string anywhere in a resource."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out.append(v)
            else:
                out.extend(_refs(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_refs(v))
    return out


def test_default_organizations(pop: Population) -> None:
    kinds = {o.id: o.kind for o in pop.organizations}
    assert kinds == {
        "mercy-general": "ehr",
        "lakeside-clinic": "ehr",
        "summit-health-plan": "payer",
        "riverside-health": "network",
        "valley-medical": "network",
    }
    for o in pop.organizations:
        assert len(o.npi) == 10 and o.npi[-1] == npi_check_digit(o.npi[:9])
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", o.oid)
        # only network orgs are reached through the gateway, by home community id
        assert (o.home_community_id is not None) == (o.kind == "network")
        if o.home_community_id:
            assert o.home_community_id == f"urn:oid:{o.oid}"
    assert len({o.mrn_system for o in pop.organizations}) == len(pop.organizations)


def test_resource_types_per_org(pop: Population) -> None:
    for org in pop.organizations:
        types = {r["resourceType"] for r in pop.resources_for(org.id)}
        if org.kind == "payer":
            assert types == PAYER_TYPES
        else:
            assert types >= EHR_TYPES, EHR_TYPES - types
    # Mercy General references Medication resources; Lakeside codes medications inline
    assert pop.resources_for("mercy-general", "Medication")
    assert not pop.resources_for("lakeside-clinic", "Medication")


def test_sample_of_every_type_validates_with_r4b_models(pop: Population) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    checked = 0
    for org in pop.org_ids:
        for r in pop.resources_for(org):
            key = (org, r["resourceType"])
            seen[key] += 1
            if seen[key] > 25:
                continue
            _model(r["resourceType"]).model_validate(r)
            checked += 1
    assert checked > 300


def test_invalid_resource_is_rejected_by_the_validator(pop: Population) -> None:
    # guards the validation test above: the models really do check what we emit
    # (the R4B models check structure and primitive formats, not required-ness or code bindings)
    good = pop.resources_for("mercy-general", "Observation")[0]
    for field, bad in (
        ("unknownField", 1),
        ("subject", "Patient/x"),
        ("effectiveDateTime", "yesterday"),
    ):
        obs = {**good, field: bad}
        with pytest.raises(ValueError):
            _model("Observation").model_validate(obs)


def test_ids_unique_and_valid_meta_everywhere(pop: Population) -> None:
    for org in pop.org_ids:
        keys = [(r["resourceType"], r["id"]) for r in pop.resources_for(org)]
        assert len(keys) == len(set(keys))
        for r in pop.resources_for(org):
            assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", r["id"])
            assert r["meta"]["versionId"].isdigit()
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["meta"]["lastUpdated"])
            # nothing may be stamped after the reference date before evolve()
            assert r["meta"]["lastUpdated"] <= "2026-11-01T12:00:00Z"


def test_every_reference_resolves_within_its_org(pop: Population) -> None:
    for org in pop.org_ids:
        present = {f"{t}/{i}" for t, i in pop.stores[org].resources}
        for r in pop.resources_for(org):
            for ref in _refs(r):
                assert ref in present, (org, r["resourceType"], ref)


def test_document_reference_points_at_a_binary_with_the_note(pop: Population) -> None:
    docs = pop.resources_for("lakeside-clinic", "DocumentReference")
    assert docs
    for d in docs[:20]:
        att = d["content"][0]["attachment"]
        binary = pop.get("lakeside-clinic", "Binary", att["url"].removeprefix("Binary/"))
        assert binary is not None
        text = base64.b64decode(binary["data"])
        assert len(text) == att["size"]
        assert b"BP " in text


def _codes(cc: dict[str, Any], system: str) -> set[str]:
    return {c["code"] for c in cc.get("coding", []) if c.get("system") == system}


def test_diabetics_have_a1c_results_and_metformin(pop: Population) -> None:
    diabetics = [h for h in pop.histories if "diabetes" in h.conditions]
    assert len(diabetics) >= 5
    with_a1c = with_metformin = 0
    for h in diabetics:
        pids = {(s.org_id, s.patient_id) for s in pop.sources if s.person_id == h.person.person_id}
        obs = [
            o
            for org, pid in pids
            for o in pop.resources_for(org, "Observation")
            if o["subject"]["reference"] == f"Patient/{pid}"
        ]
        a1c = [o for o in obs if "4548-4" in _codes(o["code"], "http://loinc.org")]
        if a1c:
            with_a1c += 1
            assert all(o["valueQuantity"]["code"] == "%" for o in a1c)
        meds = [
            m
            for org, pid in pids
            for m in pop.resources_for(org, "MedicationRequest")
            if m["subject"]["reference"] == f"Patient/{pid}"
        ]
        codes: set[str] = set()
        for m in meds:
            cc = m.get("medicationCodeableConcept")
            if cc is None:
                med = pop.get(
                    next(o for o, p in pids if m["subject"]["reference"] == f"Patient/{p}"),
                    "Medication",
                    m["medicationReference"]["reference"].split("/")[1],
                )
                assert med is not None
                cc = med["code"]
            codes |= _codes(cc, RXNORM)
        if codes & {"860975", "6809"}:
            with_metformin += 1
    # most diabetics are followed with A1c and take metformin at one of their orgs
    assert with_a1c >= len(diabetics) * 0.7
    assert with_metformin >= len(diabetics) * 0.6


def test_non_diabetics_never_get_metformin(pop: Population) -> None:
    for h in pop.histories:
        if "diabetes" not in h.conditions:
            assert "metformin" not in h.meds.values()


def test_blood_pressure_panel_has_systolic_and_diastolic_components(pop: Population) -> None:
    panels = [
        o
        for o in pop.resources_for("mercy-general", "Observation")
        if "85354-9" in _codes(o["code"], "http://loinc.org")
    ]
    assert panels
    for o in panels:
        comps = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in o["component"]}
        assert set(comps) == {"8480-6", "8462-4"}
        assert comps["8480-6"]["code"] == "mm[Hg]"
        assert comps["8480-6"]["value"] > comps["8462-4"]["value"]
        assert o["category"][0]["coding"][0]["code"] == "vital-signs"


def test_labs_have_ucum_units_reference_ranges_and_category(pop: Population) -> None:
    labs = [
        o
        for o in pop.resources_for("lakeside-clinic", "Observation")
        if o["category"][0]["coding"][0]["code"] == "laboratory" and "valueQuantity" in o
    ]
    assert len(labs) > 100
    for o in labs:
        assert o["valueQuantity"]["system"] == "http://unitsofmeasure.org"
        assert o["referenceRange"]
        assert o["interpretation"][0]["coding"][0]["code"] in {"H", "L", "N"}


def test_choice_types_and_multiple_codings_occur(pop: Population) -> None:
    obs = [o for org in pop.org_ids for o in pop.resources_for(org, "Observation")]
    keys = Counter(k for o in obs for k in o if k.startswith(("effective", "value")))
    for k in ("effectiveDateTime", "effectivePeriod", "valueQuantity", "valueCodeableConcept"):
        assert keys[k] > 0, k
    assert any(len(o["code"]["coding"]) > 1 for o in obs)  # SpO2: 59408-5 + 2708-6
    conds = pop.resources_for("mercy-general", "Condition")
    assert any(
        _codes(c["code"], "http://hl7.org/fhir/sid/icd-10-cm")
        and _codes(c["code"], "http://snomed.info/sct")
        for c in conds
    )
    decimals = [o["valueQuantity"]["value"] for o in obs if "valueQuantity" in o]
    assert any(len(repr(v).split(".")[-1]) >= 3 for v in decimals if isinstance(v, float))


def test_us_core_patient_extensions_and_identifiers(pop: Population) -> None:
    org = pop.org("mercy-general")
    for p in pop.patients_for(org.id):
        urls = {e["url"].rsplit("/", 1)[1] for e in p["extension"]}
        assert urls == {"us-core-race", "us-core-ethnicity", "us-core-birthsex"}
        mrn = [i for i in p["identifier"] if i["system"] == org.mrn_system]
        assert len(mrn) == 1 and mrn[0]["type"]["coding"][0]["code"] == "MR"


def test_payer_eobs_are_carin_bb_shaped(pop: Population) -> None:
    eobs = pop.resources_for("summit-health-plan", "ExplanationOfBenefit")
    assert len(eobs) > 50
    for e in eobs:
        assert e["meta"]["profile"][0].startswith(
            "http://hl7.org/fhir/us/carin-bb/StructureDefinition/C4BB-ExplanationOfBenefit"
        )
        for d in e.get("diagnosis", []):
            assert (
                d["diagnosisCodeableConcept"]["coding"][0]["system"]
                == "http://hl7.org/fhir/sid/icd-10-cm"
            )
        systems = {c["system"] for i in e["item"] for c in i["productOrService"]["coding"]}
        assert systems <= {"http://www.ama-assn.org/go/cpt", "urn:oid:2.16.840.1.113883.6.285"}
        assert e["insurance"][0]["focal"] is True
        sub = next(t for t in e["total"] if t["category"]["coding"][0]["code"] == "submitted")
        assert sub["amount"]["value"] == pytest.approx(
            sum(i["net"]["value"] for i in e["item"]), abs=0.05
        )
    # claims lag: nothing billed is adjudicated after the reference date
    assert max(e["meta"]["lastUpdated"] for e in eobs) <= "2026-11-01T12:00:00Z"
    covs = pop.resources_for("summit-health-plan", "Coverage")
    assert len(covs) == len(pop.patients_for("summit-health-plan"))


def test_logins_are_unique_and_point_at_patients(pop: Population) -> None:
    assert pop.logins
    kinds = {o.id: o.kind for o in pop.organizations}
    by_org: dict[str, set[str]] = {}
    for lg in pop.logins:
        assert kinds[lg.org_id] in ("ehr", "payer")
        assert lg.username not in by_org.setdefault(lg.org_id, set())
        by_org[lg.org_id].add(lg.username)
        assert pop.get(lg.org_id, "Patient", lg.patient_id) is not None
        assert len(lg.password) >= 10
    # one portal account per patient, except duplicate registrations (no account of their own)
    dups = {(org, d) for org, d, _ in pop.duplicates}
    for org in ("mercy-general", "lakeside-clinic", "summit-health-plan"):
        charts = [p for p in pop.patients_for(org) if (org, p["id"]) not in dups]
        assert len(by_org[org]) == len(charts)
        assert {lg.patient_id for lg in pop.logins if lg.org_id == org} == {p["id"] for p in charts}


def test_marital_status_and_language(pop: Population) -> None:
    patients = [p for org in pop.org_ids for p in pop.patients_for(org)]
    statuses = Counter(p["maritalStatus"]["coding"][0]["code"] for p in patients)
    assert {"M", "S"} <= set(statuses)
    langs = Counter(p["communication"][0]["language"]["coding"][0]["code"] for p in patients)
    assert langs["en-US"] > langs["es"] > 0


@pytest.mark.parametrize(
    "spec",
    [
        PopulationSpec(persons=-1),  # negative size
        PopulationSpec(years=0),  # no history window
        PopulationSpec(twin_rate=1.5),  # not a rate
        PopulationSpec(reference_date=datetime(2026, 11, 1)),  # naive: wall-clock ambiguity
    ],
)
def test_bad_specs_are_refused(spec: PopulationSpec) -> None:
    with pytest.raises(GeneratorError):
        generate_population(spec)


@pytest.mark.parametrize("persons", [0, 1, 2])
def test_tiny_worlds_generate_and_evolve(persons: int) -> None:
    from medblocks_sandbox.generator import evolve

    pop = generate_population(PopulationSpec(seed=1, persons=persons))
    assert len(pop.persons) == persons
    # the organizations' own resources exist even with nobody in the world
    assert pop.resources_for("mercy-general", "Organization")
    changes = evolve(pop, 1)
    assert bool(changes.created) == (persons > 0)


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_timestamps_are_causally_ordered(pop: Population) -> None:
    births = {}
    for org in pop.org_ids:
        for p in pop.patients_for(org):
            births[(org, p["id"])] = p["birthDate"]
    checked = 0
    for org in pop.org_ids:
        for r in pop.resources_for(org):
            lu = _dt(r["meta"]["lastUpdated"])
            t = r["resourceType"]
            if t == "Encounter":
                start, end = _dt(r["period"]["start"]), _dt(r["period"]["end"])
                assert start < end <= lu
                pid = r["subject"]["reference"].removeprefix("Patient/")
                assert births[(org, pid)] < r["period"]["start"][:10]
                checked += 1
            elif t == "Observation" and "effectiveDateTime" in r:
                assert _dt(r["effectiveDateTime"]) <= lu
                if "issued" in r:
                    assert _dt(r["effectiveDateTime"]) <= _dt(r["issued"]) <= lu
                checked += 1
            elif t == "ExplanationOfBenefit":
                assert r["billablePeriod"]["start"] <= r["created"][:10]
                assert _dt(r["created"]) <= lu
                checked += 1
    assert checked > 1000

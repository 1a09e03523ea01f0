"""Ground truth: identity (source patient -> person, with realistic noise and twins that must stay
apart) and the fact ledger (the same clinical fact at several sources)."""

from collections import Counter, defaultdict
from typing import Any

from medblocks_sandbox.generator import Population

ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def test_every_patient_has_exactly_one_truth_row(pop: Population) -> None:
    rows = Counter((org, pid) for org, pid, _ in pop.truth)
    assert all(n == 1 for n in rows.values())
    patients = {(org, p["id"]) for org in pop.org_ids for p in pop.patients_for(org)}
    assert patients == set(rows)
    persons = {p.person_id for p in pop.persons}
    assert {person for _, _, person in pop.truth} <= persons
    assert len(pop.persons) == pop.spec.persons


def test_persons_appear_at_several_orgs_with_their_own_ids(pop: Population) -> None:
    per_person: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for org, pid, person in pop.truth:
        per_person[person].append((org, pid))
    multi = [v for v in per_person.values() if len(v) >= 2]
    assert len(multi) > len(per_person) * 0.5
    for v in multi:
        assert len({pid for _, pid in v}) == len(v)  # no id shared across orgs
    # every person is known to at least one EHR org (patient access has something to pull)
    for v in per_person.values():
        assert any(org in ("mercy-general", "lakeside-clinic") for org, _ in v)


def _official(p: dict[str, Any]) -> dict[str, Any]:
    return next(n for n in p["name"] if n["use"] == "official")


def test_demographic_noise_is_present_and_bounded(pop: Population) -> None:
    noise = Counter(n for s in pop.sources for n in s.demographics.noise)
    for kind in ("nickname", "old_address", "no_phone", "no_ssn"):
        assert noise[kind] > 0, kind
    assert noise["nickname"] + noise["given_typo"] < len(pop.sources) * 0.5
    # and it shows in the resources: a nickname really replaced the given name somewhere
    truth = {p.person_id: p for p in pop.persons}
    nick = 0
    for s in pop.sources:
        if "nickname" in s.demographics.noise:
            patient = pop.get(s.org_id, "Patient", s.patient_id)
            assert patient is not None
            given = _official(patient)["given"][0]
            assert given != truth[s.person_id].given
            nick += 1
    assert nick > 0


def test_ssn_is_shared_only_sometimes(pop: Population) -> None:
    with_ssn = without = 0
    for org in pop.org_ids:
        for p in pop.patients_for(org):
            if any(i["system"] == "http://hl7.org/fhir/sid/us-ssn" for i in p["identifier"]):
                with_ssn += 1
            else:
                without += 1
    assert with_ssn > 0 and without > 0


def test_maiden_names_are_recorded_somewhere(pop: Population) -> None:
    married = {p.person_id: p for p in pop.persons if p.maiden_name}
    assert married
    seen = 0
    for s in pop.sources:
        if s.person_id in married:
            p = pop.get(s.org_id, "Patient", s.patient_id)
            assert p is not None
            families = {n["family"] for n in p["name"]}
            if married[s.person_id].maiden_name in families:
                seen += 1
    assert seen > 0


def test_twins_are_distinct_persons_with_shared_demographics(twins_pop: Population) -> None:
    pop = twins_pop
    twins = [p for p in pop.persons if p.twin_of]
    assert twins
    by_id = {p.person_id: p for p in pop.persons}
    for t in twins:
        sib = by_id[t.twin_of]
        assert t.person_id != sib.person_id
        assert t.birth_date == sib.birth_date and t.address == sib.address
        assert t.given != sib.given
        assert t.ssn != sib.ssn
    # the truth never maps a twin's records to the sibling
    person_of = {(o, p): person for o, p, person in pop.truth}
    for t in twins:
        mine = {k for k, v in person_of.items() if v == t.person_id}
        theirs = {k for k, v in person_of.items() if v == t.twin_of}
        assert mine and theirs and not (mine & theirs)


def test_fact_ledger_points_at_existing_resources(pop: Population) -> None:
    assert len(pop.fact_truth) > 1000
    for fact, org, rtype, rid in pop.fact_truth:
        assert fact.startswith("person-")
        assert pop.get(org, rtype, rid) is not None, (fact, org, rtype, rid)


def test_chronic_condition_is_on_a_problem_list_and_on_claims(pop: Population) -> None:
    by_fact: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for fact, org, rtype, rid in pop.fact_truth:
        by_fact[fact].append((org, rtype, rid))
    cond_facts = {f: v for f, v in by_fact.items() if "/cond/" in f}
    both = 0
    for fact, places in cond_facts.items():
        conds = [pop.get(o, t, i) for o, t, i in places if t == "Condition"]
        eobs = [pop.get(o, t, i) for o, t, i in places if t == "ExplanationOfBenefit"]
        if not (conds and eobs):
            continue
        both += 1
        # the claim carries the same diagnosis, as ICD-10-CM
        icd = {c["code"] for cond in conds for c in cond["code"]["coding"] if c["system"] == ICD10}
        for eob in eobs:
            assert eob is not None
            eob_icd = {d["diagnosisCodeableConcept"]["coding"][0]["code"] for d in eob["diagnosis"]}
            if icd:
                assert icd & eob_icd, fact
    assert both > 10
    # and some are repeated across several clinical sources too (hospital + network org ...)
    multi_org = [
        f for f, v in cond_facts.items() if len({o for o, t, _ in v if t == "Condition"}) >= 2
    ]
    assert multi_org


def test_same_lab_result_at_two_orgs(pop: Population) -> None:
    by_fact: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for fact, org, rtype, rid in pop.fact_truth:
        if rtype == "Observation" and "/obs/" in fact:
            by_fact[fact].append((org, rtype, rid))
    shared = {f: v for f, v in by_fact.items() if len({o for o, _, _ in v}) >= 2}
    assert shared
    for places in shared.values():
        obs = [pop.get(o, t, i) for o, t, i in places]
        codes = {o["code"]["coding"][0]["code"] for o in obs if o}
        values = {repr(o.get("valueQuantity", o.get("valueCodeableConcept"))) for o in obs if o}
        assert len(codes) == 1 and len(values) == 1


def test_same_immunization_at_two_orgs(pop: Population) -> None:
    by_fact: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for fact, org, rtype, rid in pop.fact_truth:
        if rtype == "Immunization":
            by_fact[fact].add((org, rid))
    shared = [v for v in by_fact.values() if len(v) >= 2]
    assert shared
    for places in shared:
        imms = [pop.get(o, "Immunization", i) for o, i in places]
        assert len({i["vaccineCode"]["coding"][0]["code"] for i in imms if i}) == 1
        assert sum(1 for i in imms if i and i["primarySource"]) <= 1


def test_twins_often_registered_at_the_same_org_with_the_same_birth_date(
    twins_pop: Population,
) -> None:
    pop = twins_pop
    person_of = {(o, p): person for o, p, person in pop.truth}
    by_id = {p.person_id: p for p in pop.persons}
    same_org_pairs = 0
    for org in pop.org_ids:
        born: dict[str, set[str]] = defaultdict(set)
        for patient in pop.patients_for(org):
            born[patient["birthDate"]].add(person_of[(org, patient["id"])])
        for persons in born.values():
            if any(by_id[p].twin_of in persons for p in persons):
                same_org_pairs += 1
    # the hard case for linkage exists: two persons, one org, one birth date, one address
    assert same_org_pairs > 0


def test_duplicate_registrations_within_one_org(pop: Population) -> None:
    assert pop.duplicates
    person_of = {(o, p): person for o, p, person in pop.truth}
    for org, dup, main in pop.duplicates:
        # two charts at one org, one person: the linkage must merge them
        assert person_of[(org, dup)] == person_of[(org, main)]
        d, m = pop.get(org, "Patient", dup), pop.get(org, "Patient", main)
        assert d is not None and m is not None
        org_info = pop.org(org)
        mrn = {
            i["value"]
            for p in (d, m)
            for i in p["identifier"]
            if i["system"] == org_info.mrn_system
        }
        assert len(mrn) == 2
        # the duplicate holds its own encounter(s), which the main chart does not
        encs = pop.resources_for(org, "Encounter")
        dup_encs = {e["id"] for e in encs if e["subject"]["reference"] == f"Patient/{dup}"}
        main_encs = {e["id"] for e in encs if e["subject"]["reference"] == f"Patient/{main}"}
        assert dup_encs and main_encs and not (dup_encs & main_encs)

"""The CDS index and cards over a warehouse built by the real build (identity + unified record)
from sandbox resources landed through two organizations: the SQL of the index matches the real
tables, and a patient at one organization sees what the other holds."""

from typing import Any

import pytest

from medblocks_pipelines.lib.cds.cards import CardContext, patient_view_cards
from medblocks_pipelines.lib.cds.index import load_snapshot
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_pipelines_tests.clinician_workflow.cards_check import assert_no_empty


@pytest.fixture(scope="module")
def population() -> Any:
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    return generate_population(PopulationSpec(seed=11, persons=25))


def test_index_over_a_real_build(settings: Settings, population: Any) -> None:
    orgs = [o.id for o in population.organizations if o.kind == "ehr"][:2]
    for org in orgs:
        prov = Provenance(
            tenant="acme",
            pattern="backend",
            source=org,
            organization=org,
            connection=None,
            run_id=f"run-{org}",
        )
        with LakeWriter(settings.lake_root, prov) as w:
            for res in population.resources_for(org):
                w.add(res)
    result = build_warehouse("acme", settings=settings)
    snap = load_snapshot(result.path)
    assert snap.persons > 0 and snap.facts.height > 0
    # Find a person known at both organizations with facts stated only by the second one.
    best = None
    for here, other in (orgs, orgs[::-1]):
        for key, person in sorted(snap.patient_person.items()):
            if not key.startswith(f"{here}/Patient/"):
                continue
            facts = snap.facts_of(person)
            if any(other in f["sources"] and here not in f["sources"] for f in facts):
                best = (here, other, key.rsplit("/", 1)[-1], person, facts)
                break
        if best:
            break
    assert best is not None, "no person shared by the two organizations"
    here, other, patient_id, person, facts = best
    assert snap.person_for(here, patient_id) == person
    assert all(f["codes"] for f in facts if f["kind"] in ("condition", "result"))
    cards = patient_view_cards(
        facts,
        CardContext(
            service_id="medblocks-patient-view",
            person_id=person,
            here_source=here,
            patient_id=patient_id,
            today=__import__("datetime").date.today(),
            app_url="http://app.example/ehr/launch",
        ),
    )
    beyond = next(c for c in cards if c["source"]["topic"]["code"] == "records-elsewhere")
    assert_no_empty(beyond)
    assert f"source: {other}" in beyond["detail"] and "pattern: EHR bulk sync" in beyond["detail"]

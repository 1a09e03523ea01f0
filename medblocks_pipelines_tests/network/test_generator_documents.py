"""The sandbox renderer on the real synthetic population: every network patient's CCD converts
to R4-valid resources with nothing quarantined, and the gateway finds them by demographics."""

from collections import Counter

from fhir.resources.R4B import get_fhir_model_class

from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.ccda import SourceDocument, convert_ccda
from medblocks_sandbox.gateway.community import _load
from medblocks_sandbox.gateway.render import render_ccd
from medblocks_sandbox.gateway.respond import _match
from medblocks_sandbox.generator.model import PopulationSpec
from medblocks_sandbox.generator.population import generate_population


def test_population_ccds_convert_cleanly() -> None:
    pop = generate_population(PopulationSpec(seed=11, persons=12))
    communities = _load(pop, None)
    assert set(communities) == {"riverside-health", "valley-medical"}
    types: Counter[str] = Counter()
    social = with_race = 0
    for com in communities.values():
        for pid, patient in com.patients.items():
            uid = com.doc_uid(pid, "ccd")
            xml = render_ccd(
                patient,
                com.resources.get(pid, []),
                org={"name": com.org.name, "oid": com.oid},
                document_id=uid,
            )
            result = convert_ccda(xml, SourceDocument(com.hcid, com.repository, uid))
            assert result.quarantined == []
            for res in result.resources:
                get_fhir_model_class(res["resourceType"]).model_validate(res)
            types.update(result.counts_by_type())
            for res in result.resources:
                cats = [
                    c.get("code")
                    for cat in res.get("category", [])
                    if isinstance(cat, dict)
                    for c in cat.get("coding", [])
                ]
                social += "social-history" in cats
                if res["resourceType"] == "Patient":
                    urls = {e["url"] for e in res.get("extension", [])}
                    with_race += (
                        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race" in urls
                    )
                    # The community's MRN is the patient identifier, not the FHIR id.
                    assert {"system": f"urn:oid:{com.oid}.1", "value": com.mrn(pid)} in res[
                        "identifier"
                    ]
            # XCPD by the patient's own demographics finds exactly this patient.
            assert [p["id"] for p in _match(com, ihe.Demographics.from_patient(patient))] == [pid]
    assert types["Observation"] > 50 and types["Condition"] > 0 and types["Encounter"] > 0
    assert social > 0 and with_race == types["Patient"]

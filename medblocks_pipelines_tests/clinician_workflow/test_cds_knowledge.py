"""CDS knowledge packs (load, refuse, plug in), ingredient resolution (record, names, a FHIR
terminology server on loopback and its error paths) and the card texts built on them."""

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from medblocks_pipelines.lib.cds.cards import CardContext, beyond_this_ehr, provenance
from medblocks_pipelines.lib.cds.ingredients import (
    TerminologyClient,
    fact_ingredients,
    order_ingredients,
)
from medblocks_pipelines.lib.cds.knowledge import (
    PACKS_DIR,
    SCHEMA_FILE,
    KnowledgeBase,
    knowledge_from_env,
    load_knowledge,
    load_pack,
    pack_json_schema,
)
from medblocks_pipelines.lib.cds.order_cards import order_cards
from medblocks_pipelines.lib.cds.service import describe_services
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_sandbox.run import serve

RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
TEST_PACKS = Path(__file__).parent / "packs"
TODAY = date(2026, 6, 1)


def test_schema_file_is_the_models_schema() -> None:
    shipped = json.loads((PACKS_DIR / SCHEMA_FILE).read_text())
    assert shipped == json.loads(json.dumps(pack_json_schema()))


def test_every_shipped_pack_is_cited_versioned_and_loads() -> None:
    kb = load_knowledge()
    assert {p.id for p in kb.packs} == {"onc-high-priority-ddi", "vsac-ecqm-2025"}
    for pack in kb.packs:
        assert pack.source and pack.version and pack.licence and pack.codes_checked_against
    # Ingredient codes are names' codes, one role each (the old table reused 10689 as two drugs).
    names: dict[str, str] = {}
    for pack in kb.packs:
        for inter in pack.interactions:
            for m in inter.object.members + inter.precipitant.members:
                assert names.setdefault(m.rxnorm, m.name) == m.name


@pytest.mark.parametrize(
    "codes, expected",
    [
        ([f"{ICD}|E11.9"], True),  # ICD-10-CM with its dot
        ([f"{ICD}|E119"], True),  # and without
        (["http://snomed.info/sct|44054006"], True),  # type 2 diabetes mellitus
        (["http://snomed.info/sct|11687002"], False),  # gestational diabetes: excluded by VSAC
        ([f"{ICD}|O24.4"], False),
    ],
)
def test_diabetes_value_set_by_oid(codes: list[str], expected: bool) -> None:
    assert load_knowledge().in_value_set("diabetes", codes) is expected


def test_broken_or_duplicate_packs_refuse_to_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "x-pack", "title": "t", "version": "1"}))
    with pytest.raises(ConfigError, match="bad.json"):
        load_pack(bad)
    wrong_code = json.loads((TEST_PACKS / "test-penicillin-class.json").read_text())
    wrong_code["allergy_groups"][0]["members"][0]["rxnorm"] = "penicillin"
    bad.write_text(json.dumps(wrong_code))
    with pytest.raises(ConfigError, match="digits"):
        load_pack(bad)
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "copy.json").write_text((PACKS_DIR / "onc-high-priority-ddi.json").read_text())
    with pytest.raises(ConfigError, match="same id"):
        load_knowledge(dup)


def test_operator_packs_by_env() -> None:
    kb = knowledge_from_env({"MEDBLOCKS_CDS_PACKS_DIR": str(TEST_PACKS)})
    assert "test-penicillin-class" in {p.id for p in kb.packs} and kb.has_allergy_classes
    only = knowledge_from_env(
        {"MEDBLOCKS_CDS_PACKS_DIR": str(TEST_PACKS), "MEDBLOCKS_CDS_DEFAULT_PACKS": "0"}
    )
    assert [p.id for p in only.packs] == ["test-penicillin-class"] and not only.has_interactions


# ---------------------------------------------------------------------------------------------
# ingredients
# ---------------------------------------------------------------------------------------------
def _order(**med: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": "o1", **med}


@pytest.mark.parametrize(
    "order, drafts, expected",
    [
        # an ingredient code as it is
        (
            _order(medicationCodeableConcept={"coding": [{"system": RX, "code": "7646"}]}),
            [],
            {"7646"},
        ),
        # a clinical drug named in its display (word match: esomeprazole is not omeprazole)
        (
            _order(
                medicationCodeableConcept={"text": "esomeprazole 40 MG Delayed Release Capsule"}
            ),
            [],
            {"283742"},
        ),
        # a Medication in draftOrders, its ingredient coding
        (
            _order(medicationReference={"reference": "Medication/m9"}),
            [
                {
                    "resourceType": "Medication",
                    "id": "m9",
                    "ingredient": [
                        {"itemCodeableConcept": {"coding": [{"system": RX, "code": "343047"}]}}
                    ],
                }
            ],
            {"343047"},
        ),
        # nothing to go on
        (_order(medicationCodeableConcept={"text": "house mix"}), [], set()),
    ],
)
def test_order_ingredients_from_the_record(
    order: dict[str, Any], drafts: list[dict[str, Any]], expected: set[str]
) -> None:
    assert set(order_ingredients(order, load_knowledge(), None, drafts).ingredients) == expected


def tx_app(calls: list[str]) -> Starlette:
    """A tiny FHIR terminology server: one ConceptMap (SCD -> IN) and RxNorm displays."""

    async def translate(request: Request) -> JSONResponse:
        calls.append(str(request.url.query))
        q = request.query_params
        if q.get("url") != "http://example.org/ConceptMap/scd-to-in" or q.get("system") != RX:
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=400)
        matches = {"999001": "343047"}.get(q.get("code", ""))
        params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": matches is not None}]
        if matches:
            params.append(
                {
                    "name": "match",
                    "part": [
                        {"name": "equivalence", "valueCode": "wider"},
                        {"name": "concept", "valueCoding": {"system": RX, "code": matches}},
                    ],
                }
            )
        return JSONResponse({"resourceType": "Parameters", "parameter": params})

    async def lookup(request: Request) -> JSONResponse:
        calls.append(str(request.url.query))
        display = {"999002": "pantoprazole 40 MG Delayed Release Oral Tablet"}.get(
            request.query_params.get("code", "")
        )
        if display is None:
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=404)
        return JSONResponse(
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "display", "valueString": display}],
            }
        )

    return Starlette(
        routes=[
            Route("/fhir/ConceptMap/$translate", translate),
            Route("/fhir/CodeSystem/$lookup", lookup),
        ]
    )


def test_terminology_server_resolves_clinical_drugs_over_loopback() -> None:
    calls: list[str] = []
    kb = load_knowledge()
    with serve(lambda base: tx_app(calls)) as base, httpx.Client() as http:
        tx = TerminologyClient.from_env(
            http,
            {
                "MEDBLOCKS_CDS_TERMINOLOGY_URL": f"{base}/fhir/",
                "MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP": "http://example.org/ConceptMap/scd-to-in",
            },
        )
        assert tx is not None
        scd = _order(medicationCodeableConcept={"coding": [{"system": RX, "code": "999001"}]})
        assert "343047" in order_ingredients(scd, kb, tx).ingredients
        bare = _order(medicationCodeableConcept={"coding": [{"system": RX, "code": "999002"}]})
        assert "40790" in order_ingredients(bare, kb, tx).ingredients
        n = len(calls)
        order_ingredients(scd, kb, tx)
        assert len(calls) == n  # answers are cached
        unknown = _order(medicationCodeableConcept={"coding": [{"system": RX, "code": "1"}]})
        assert order_ingredients(unknown, kb, tx).ingredients == {"1"}
    assert tx.failures == 0


@pytest.mark.parametrize(
    "handler",
    [
        lambda req: httpx.Response(500, json={"resourceType": "OperationOutcome"}),
        lambda req: httpx.Response(200, content=b"{not json"),
        lambda req: httpx.Response(429),
        lambda req: (_ for _ in ()).throw(httpx.ConnectTimeout("slow", request=req)),
    ],
    ids=["500", "junk", "429", "timeout"],
)
def test_terminology_failures_cost_only_that_step(handler: Any) -> None:
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        tx = TerminologyClient("http://tx.test/fhir", http, conceptmap="http://m")
        order = _order(
            medicationCodeableConcept={
                "coding": [{"system": RX, "code": "999001", "display": "Reyataz 300 mg"}]
            }
        )
        resolved = order_ingredients(order, load_knowledge(), tx)
    assert set(resolved.ingredients) == {"999001"}  # the code itself, nothing invented
    assert tx.failures >= 1  # counted (and logged by type), not cached as "unknown"
    assert not tx._cache


def test_the_server_is_not_asked_what_the_record_already_says() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        tx = TerminologyClient("http://tx.test/fhir", http, conceptmap="http://m")
        order = _order(
            medicationCodeableConcept={
                "coding": [{"system": RX, "code": "999001", "display": "omeprazole 20 MG"}]
            }
        )
        assert "7646" in order_ingredients(order, load_knowledge(), tx).ingredients
    assert calls == []


# ---------------------------------------------------------------------------------------------
# card texts
# ---------------------------------------------------------------------------------------------
def _fact(fid: str, kind: str, days: int, **kw: Any) -> dict[str, Any]:
    when = TODAY - timedelta(days=days)
    return {
        "fact_id": fid,
        "kind": kind,
        "display": fid,
        "last_date": when,
        "sources": ["ehr-b"],
        "patterns": ["backend"],
        "organizations": ["riverside"],
        "codes": [],
        **kw,
    }


def _ctx(kb: KnowledgeBase | None = None) -> CardContext:
    return CardContext(
        service_id="svc",
        person_id="P1",
        here_source="ehr-a",
        patient_id="a1",
        today=TODAY,
        organization_names={"mercy": "Mercy Hospital", "riverside": "Riverside Clinic"},
        here_organizations=frozenset({"mercy"}),
        knowledge=kb if kb is not None else load_knowledge(),
    )


def test_calling_organization_is_not_in_its_own_provenance_line() -> None:
    both = _fact(
        "lipid", "result", 3, sources=["ehr-a", "ehr-b"], organizations=["mercy", "riverside"]
    )
    line = provenance(both, _ctx())
    assert "Riverside Clinic" in line and "Mercy" not in line


def test_counts_are_pluralised_and_most_recent_is_by_relevance_not_vitals_first() -> None:
    facts = [
        _fact("bp", "result", 1, category="vital-signs"),
        _fact("pulse", "result", 2, category="vital-signs"),
        _fact("weight", "result", 3, category="vital-signs"),
        _fact("penicillin", "allergy", 900),
        _fact("omeprazole", "medication", 40),
        _fact("asthma", "condition", 400),
    ]
    card = beyond_this_ehr(facts, _ctx())
    assert card is not None
    detail = card["detail"]
    assert "1 medication," in detail and "1 condition" in detail and "1 allergy" in detail
    assert "3 results" in detail and "1 medications" not in detail
    recent = [ln for ln in detail.splitlines() if ln.startswith("- ")]
    assert [ln.split(" ")[1] for ln in recent] == ["penicillin", "asthma", "omeprazole"]


def test_a_single_item_is_singular() -> None:
    card = beyond_this_ehr([_fact("omeprazole", "medication", 40)], _ctx())
    assert card is not None
    assert card["summary"] == "1 item from 1 other source not in this chart"
    assert "**Not in this chart:** 1 medication." in card["detail"]


def test_an_order_card_names_its_pack_and_version() -> None:
    kb = load_knowledge()
    med = _fact("omeprazole", "medication", 10, codes=[f"{RX}|7646"], status="active")
    assert fact_ingredients(med, kb).ingredients == {"7646"}
    order = _order(medicationCodeableConcept={"coding": [{"system": RX, "code": "343047"}]})
    cards = order_cards([order], [med], _ctx(kb))
    assert len(cards) == 1
    assert cards[0]["source"]["label"].endswith(
        "ONC high-priority drug-drug interactions (subset) 2012.1"
    )
    assert "Knowledge: ONC high-priority" in cards[0]["detail"]


def test_discovery_without_packs_promises_no_knowledge_checks() -> None:
    services = {s["hook"]: s for s in describe_services(KnowledgeBase())}
    order = services["order-select"]["description"]
    assert "no interaction checking" in order and "drug class" not in order
    assert "HbA1c" not in services["patient-view"]["description"]
    assert all("extension" not in s for s in services.values())
    with_class = describe_services(knowledge_from_env({"MEDBLOCKS_CDS_PACKS_DIR": str(TEST_PACKS)}))
    assert (
        "drug class as listed in: TEST ONLY penicillin class 0.0-test"
        in with_class[1]["description"]
    )

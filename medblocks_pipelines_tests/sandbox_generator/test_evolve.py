"""evolve(): incremental change sets with new versions, new resources and deletions."""

import pytest

from medblocks_sandbox.errors import GeneratorError
from medblocks_sandbox.generator import (
    Population,
    PopulationSpec,
    evolve,
    generate_population,
)


@pytest.fixture
def fresh() -> Population:
    """A private world per test: evolve() mutates the population in place."""
    return generate_population(PopulationSpec(seed=21, persons=35))


def _snapshot(pop: Population) -> dict[tuple[str, str, str], dict]:
    return {
        (org, r["resourceType"], r["id"]): r for org in pop.org_ids for r in pop.resources_for(org)
    }


def test_updates_bump_version_and_last_updated(fresh: Population) -> None:
    before = {
        k: (r["meta"]["versionId"], r["meta"]["lastUpdated"]) for k, r in _snapshot(fresh).items()
    }
    horizon = max(lu for _, lu in before.values())
    changes = evolve(fresh, 1)
    assert changes.updated
    for org, r in changes.updated:
        old_version, old_lu = before[(org, r["resourceType"], r["id"])]
        assert int(r["meta"]["versionId"]) == int(old_version) + 1
        assert r["meta"]["lastUpdated"] > horizon >= old_lu
        assert fresh.get(org, r["resourceType"], r["id"]) is r


def test_created_resources_are_new_and_stored(fresh: Population) -> None:
    before = set(_snapshot(fresh))
    changes = evolve(fresh, 1)
    kinds = {r["resourceType"] for _, r in changes.created}
    assert {"Encounter", "Observation"} <= kinds
    for org, r in changes.created:
        assert (org, r["resourceType"], r["id"]) not in before
        assert fresh.get(org, r["resourceType"], r["id"]) is r
        assert r["meta"]["versionId"] == "1"
        assert r["meta"]["lastUpdated"] >= changes.last_updated
    # a visit by a member is claimed at the payer in the same step
    assert any(
        org == "summit-health-plan" and r["resourceType"] == "ExplanationOfBenefit"
        for org, r in changes.created
    )


def test_deletions_remove_resources_and_their_facts(fresh: Population) -> None:
    changes = evolve(fresh, 1)
    assert changes.deleted
    ledger = {(o, t, i) for _, o, t, i in fresh.fact_truth}
    for org, rtype, rid in changes.deleted:
        assert fresh.get(org, rtype, rid) is None
        assert (org, rtype, rid) not in ledger


def test_since_previous_step_returns_exactly_the_changes(fresh: Population) -> None:
    evolve(fresh, 1)
    mark = max(r["meta"]["lastUpdated"] for r in _snapshot(fresh).values())
    changes = evolve(fresh, 2)
    newer = {k for k, r in _snapshot(fresh).items() if r["meta"]["lastUpdated"] > mark}
    expected = {(o, r["resourceType"], r["id"]) for o, r in [*changes.created, *changes.updated]}
    assert newer == expected


def test_new_references_resolve_after_evolve(fresh: Population) -> None:
    from medblocks_pipelines_tests.sandbox_generator.test_population import _refs

    changes = evolve(fresh, 1)
    for org, r in [*changes.created, *changes.updated]:
        present = {f"{t}/{i}" for t, i in fresh.stores[org].resources}
        for ref in _refs(r):
            assert ref in present, (org, r["resourceType"], ref)


def test_step_twice_or_backwards_is_refused(fresh: Population) -> None:
    evolve(fresh, 2)
    with pytest.raises(GeneratorError):
        evolve(fresh, 2)
    with pytest.raises(GeneratorError):
        evolve(fresh, 1)
    with pytest.raises(GeneratorError):
        evolve(fresh, 0)


def test_merges_link_duplicate_charts(fresh: Population) -> None:
    assert fresh.duplicates
    for step in range(1, 6):
        evolve(fresh, step)
    assert fresh.merged
    for org, dup_id, main_id in fresh.merged:
        dup = fresh.get(org, "Patient", dup_id)
        main = fresh.get(org, "Patient", main_id)
        assert dup is not None and main is not None
        assert dup["active"] is False
        assert dup["link"] == [
            {"other": {"reference": f"Patient/{main_id}"}, "type": "replaced-by"}
        ]
        assert main["link"][0]["type"] == "replaces"
    # merged at most once each
    assert len(set(fresh.merged)) == len(fresh.merged)

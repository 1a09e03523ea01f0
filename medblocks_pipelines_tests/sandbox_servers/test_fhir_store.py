"""Unit tests of the FhirStore: versions, deletions, `_since` windows, compartments, search values.

Pure in-process (no sockets): the store is a library that the REST and Bulk servers share.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from medblocks_pipelines_tests.sandbox_servers.fixture_data import ehr_resources
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_match import parse_date_range
from medblocks_sandbox.fhir_store import FhirStore


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("2024", datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)),
        ("2024-12", datetime(2024, 12, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)),
        ("2024-02-29", datetime(2024, 2, 29, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        # a zone shifts the instant to UTC
        (
            "2024-01-01T00:30:00+01:00",
            datetime(2023, 12, 31, 23, 30, tzinfo=UTC),
            datetime(2023, 12, 31, 23, 30, 1, tzinfo=UTC),
        ),
        # fractional seconds set the precision
        (
            "2024-01-01T00:00:00.5Z",
            datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC),
            datetime(2024, 1, 1, 0, 0, 0, 600000, tzinfo=UTC),
        ),
    ],
)
def test_parse_date_range(text: str, low: datetime, high: datetime) -> None:
    assert parse_date_range(text) == (low, high)


@pytest.mark.parametrize("bad", ["24", "2024-1", "2024-01-01T25", "yesterday", "2024/01/01"])
def test_parse_date_range_refuses_non_dates(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_date_range(bad)


def test_versions_and_deletions() -> None:
    store = FhirStore(ehr_resources())
    first = store.get("Condition", "cond1")
    assert first is not None and first["meta"]["versionId"] == "1"
    updated = store.put({**first, "clinicalStatus": {"coding": [{"code": "resolved"}]}})
    assert updated["meta"]["versionId"] == "2"
    assert updated["meta"]["lastUpdated"] > first["meta"]["lastUpdated"]
    v1 = store.vread("Condition", "cond1", "1")
    assert v1 is not None and v1.resource is not None
    assert v1.resource["clinicalStatus"] == {"coding": [{"code": "active"}]}
    assert store.delete("Condition", "cond1") is True
    assert store.delete("Condition", "cond1") is False  # already deleted
    assert (
        store.state("Condition", "cond1") == "deleted" and store.get("Condition", "cond1") is None
    )
    assert store.state("Condition", "nope") == "absent"
    assert [v.resource is None for v in store.history("Condition", "cond1")] == [False, False, True]
    # A recreated resource continues the version sequence.
    again = store.put(
        {"resourceType": "Condition", "id": "cond1", "subject": {"reference": "Patient/p2"}}
    )
    assert again["meta"]["versionId"] == "4"
    assert store.compartment_of("Condition", "cond1") == frozenset({"p2"})


def test_put_copies_its_input() -> None:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": "x", "name": [{"family": "A"}]}
    store = FhirStore([resource])
    resource["name"][0]["family"] = "changed in place"
    assert store.get("Patient", "x")["name"][0]["family"] == "A"  # type: ignore[index]


def test_changes_since_window() -> None:
    store = FhirStore(ehr_resources())
    mark = store.now()
    store.put({"resourceType": "Observation", "id": "new", "subject": {"reference": "Patient/p1"}})
    store.delete("Observation", "bp-1")
    middle = store.now()
    store.put({"resourceType": "Observation", "id": "later"})
    changed, deleted = store.changes_since(mark, until=middle)
    assert [r["id"] for r in changed] == ["new"]
    assert [(t, i) for t, i, _ in deleted] == [("Observation", "bp-1")]
    changed, deleted = store.changes_since(middle)
    assert [r["id"] for r in changed] == ["later"] and deleted == []
    everything, none = store.changes_since(None, types=["Patient"])
    assert {r["id"] for r in everything} == {"p1", "p2"} and none == []


def test_keep_last_updated_only_when_in_the_past() -> None:
    past = "2020-01-01T00:00:00.000Z"
    future = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    store = FhirStore(
        [
            {"resourceType": "Patient", "id": "a", "meta": {"lastUpdated": past}},
            {"resourceType": "Patient", "id": "b", "meta": {"lastUpdated": future}},
        ]
    )
    assert store.get("Patient", "a")["meta"]["lastUpdated"] == past  # type: ignore[index]
    assert store.get("Patient", "b")["meta"]["lastUpdated"] < future  # type: ignore[index]


def test_compartments_include_binary_behind_documents() -> None:
    store = FhirStore(ehr_resources())
    p1 = {(r["resourceType"], r["id"]) for r in store.compartment("p1")}
    assert ("Binary", "bin1") in p1 and ("Observation", "a1c-0") in p1
    assert ("Practitioner", "dr1") not in p1  # shared, not in the compartment
    assert store.compartment_of("Observation", "b-a1c") == frozenset({"p2"})
    # A Binary loaded before its document still lands in the compartment.
    late = FhirStore(list(reversed(ehr_resources())))
    assert late.compartment_of("Binary", "bin1") == frozenset({"p1"})


@pytest.mark.parametrize(
    ("rtype", "params", "expected"),
    [
        ("Patient", [("name", "ali")], {"p1"}),  # string: case-insensitive prefix
        ("Patient", [("family:exact", "smith")], set()),  # :exact is case-sensitive
        ("Patient", [("family:exact", "Smith")], {"p1"}),
        ("Patient", [("given:contains", "o")], {"p2"}),
        ("Patient", [("identifier", "urn:mrn|MRN2")], {"p2"}),
        ("Patient", [("gender:not", "male")], {"p1"}),
        ("Patient", [("birthdate", "lt1975")], {"p1"}),
        ("Encounter", [("date", "2024-03-01")], {"enc1"}),  # period inside the day
        ("Encounter", [("date", "ge2024-03-01T09:30:00Z")], {"enc1"}),  # overlaps
        ("Encounter", [("date", "sa2024-03-01T10:00:00Z")], set()),
        ("MedicationRequest", [("medication", "med1")], {"mr1"}),
        ("MedicationRequest", [("code", "197361")], {"mr2"}),
        ("Observation", [("subject:Patient", "p2")], {"b-a1c"}),
        ("Observation", [("code", r"4548-4\,x")], set()),  # escaped comma is literal
    ],
)
def test_search_values(rtype: str, params: list, expected: set) -> None:
    store = FhirStore(ehr_resources())
    assert {r["id"] for r in store.search(rtype, params)} == expected


def test_search_unknown_parameter_is_a_400() -> None:
    store = FhirStore(ehr_resources())
    with pytest.raises(FhirHttpError) as err:
        store.search("Patient", [("shoe-size", "9")])
    assert err.value.status == 400 and err.value.code == "not-supported"

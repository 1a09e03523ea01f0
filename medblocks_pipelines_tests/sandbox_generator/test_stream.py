"""stream_bulk_ndjson(): the scale path writes exactly N valid, realistic resources, streaming."""

import hashlib
import importlib
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from medblocks_sandbox.errors import GeneratorError
from medblocks_sandbox.generator import stream_bulk_ndjson


def _lines(root: Path) -> list[dict]:
    out = []
    for p in sorted(root.glob("*.ndjson")):
        with p.open() as f:
            out.extend(json.loads(line) for line in f)
    return out


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_exact_count_and_valid_json(tmp_path: Path, n: int) -> None:
    stats = stream_bulk_ndjson(tmp_path, resources=n, seed=3)
    rows = _lines(tmp_path)
    assert len(rows) == n == stats["resources"]
    assert sum(stats["by_type"].values()) == n
    assert stats["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.ndjson"))


def test_ids_unique_and_patient_references_resolve(tmp_path: Path) -> None:
    stream_bulk_ndjson(tmp_path, resources=8000, seed=4)
    rows = _lines(tmp_path)
    keys = Counter((r["resourceType"], r["id"]) for r in rows)
    assert max(keys.values()) == 1
    patients = {r["id"] for r in rows if r["resourceType"] == "Patient"}
    for r in rows:
        for field in ("subject", "patient", "beneficiary"):
            if field in r:
                assert r[field]["reference"].removeprefix("Patient/") in patients
    # shapes are the generator's, copies differ in names, dates and values
    fams = {r["name"][0]["family"] for r in rows if r["resourceType"] == "Patient"}
    assert len(fams) > 20
    values = Counter(r["valueQuantity"]["value"] for r in rows if "valueQuantity" in r)
    assert len(values) > 500


def test_sample_validates_with_r4b_models(tmp_path: Path) -> None:
    stream_bulk_ndjson(tmp_path, resources=6000, seed=5)
    seen: Counter[str] = Counter()
    for r in _lines(tmp_path):
        t = r["resourceType"]
        seen[t] += 1
        if seen[t] <= 15:
            model = getattr(importlib.import_module(f"fhir.resources.R4B.{t.lower()}"), t)
            model.model_validate(r)
    assert {"Patient", "Observation", "Encounter", "ExplanationOfBenefit"} <= set(seen)


def test_files_per_type_and_determinism(tmp_path: Path) -> None:
    a = stream_bulk_ndjson(tmp_path / "a", resources=3000, seed=6, files_per_type=3)
    stream_bulk_ndjson(tmp_path / "b", resources=3000, seed=6, files_per_type=3)
    assert "Observation.002.ndjson" in a["files"]

    def digest(p: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in p.glob("*.ndjson")}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    stream_bulk_ndjson(tmp_path / "c", resources=3000, seed=7, files_per_type=3)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_org_selection_limits_shapes(tmp_path: Path) -> None:
    stats = stream_bulk_ndjson(tmp_path, resources=2000, seed=1, orgs=["summit-health-plan"])
    assert set(stats["by_type"]) <= {
        "Patient",
        "Coverage",
        "ExplanationOfBenefit",
        "Organization",
        "Practitioner",
    }


def test_memory_stays_bounded(tmp_path: Path) -> None:
    # peak Python allocations must not grow with the number of resources written
    stream_bulk_ndjson(tmp_path / "warm", resources=1, seed=2)  # compile the shapes first
    tracemalloc.start()
    stream_bulk_ndjson(tmp_path / "s", resources=1500, seed=2, buffer_bytes=1 << 15)
    _, small = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    stream_bulk_ndjson(tmp_path / "l", resources=15000, seed=2, buffer_bytes=1 << 15)
    _, large = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert large < small * 1.5 + (2 << 20)


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(GeneratorError):
        stream_bulk_ndjson(tmp_path, resources=-1, seed=1)
    with pytest.raises(GeneratorError):
        stream_bulk_ndjson(tmp_path, resources=10, seed=1, files_per_type=0)


def test_per_org_layout_with_identity_truth(tmp_path: Path) -> None:
    import csv

    stats = stream_bulk_ndjson(tmp_path, resources=12000, seed=3, per_org=True, truth=True)
    assert all("/" in name for name in stats["files"])
    patients: dict[tuple[str, str], dict] = {}
    for path in tmp_path.glob("*/Patient.ndjson"):
        with path.open() as f:
            for line in f:
                p = json.loads(line)
                patients[(path.parent.name, p["id"])] = p
    with (tmp_path / "truth" / "identity.csv").open() as f:
        rows = list(csv.DictReader(f))
    # exactly one truth row per emitted patient, and every row names an emitted patient
    assert {(r["org_id"], r["source_patient_id"]) for r in rows} == set(patients)
    assert len(rows) == len(patients) == stats["by_type"]["Patient"]
    by_person: dict[str, list[dict]] = {}
    for r in rows:
        by_person.setdefault(r["person_id"], []).append(
            patients[(r["org_id"], r["source_patient_id"])]
        )
    linked = [ps for ps in by_person.values() if len(ps) > 1]
    assert len(linked) > len(by_person) * 0.4
    ssn_owner: dict[str, str] = {}
    for person, ps in by_person.items():
        # a copied person keeps one birth date across orgs except for injected errors
        assert len({p["birthDate"] for p in ps}) <= 2
        for p in ps:
            for ident in p["identifier"]:
                if ident["system"] == "http://hl7.org/fhir/sid/us-ssn":
                    digits = ident["value"].replace("-", "")
                    assert ssn_owner.setdefault(digits, person) == person
    # copies of one sample family are different families: names, MRNs and SSNs are not reused
    mrns = Counter(
        (org, i["value"])
        for (org, _), p in patients.items()
        for i in p["identifier"]
        if i["type"]["coding"][0]["code"] in ("MR", "MB")
    )
    assert max(mrns.values()) == 1
    families = Counter(p["name"][0]["family"] for p in patients.values())
    assert len(families) > 40


def test_records_of_a_copied_person_share_the_new_family_name(tmp_path: Path) -> None:
    import csv

    stream_bulk_ndjson(tmp_path, resources=15000, seed=8, per_org=True, truth=True)
    patients = {}
    for path in tmp_path.glob("*/Patient.ndjson"):
        with path.open() as f:
            for line in f:
                p = json.loads(line)
                patients[(path.parent.name, p["id"])] = p
    with (tmp_path / "truth" / "identity.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_person: dict[str, set[str]] = {}
    for r in rows:
        p = patients[(r["org_id"], r["source_patient_id"])]
        by_person.setdefault(r["person_id"], set()).update(n["family"] for n in p["name"])
    # usually one family name per person (two with a maiden name or a misspelling)
    single = sum(1 for names in by_person.values() if len(names) == 1)
    assert single > len(by_person) * 0.6
    assert all(len(names) <= 3 for names in by_person.values())


def test_fact_truth_of_the_scale_path_points_at_emitted_resources(tmp_path: Path) -> None:
    import csv

    stream_bulk_ndjson(tmp_path, resources=12345, seed=9, per_org=True, truth=True)
    emitted: set[tuple[str, str, str]] = set()
    for path in tmp_path.glob("*/*.ndjson"):
        with path.open() as f:
            for line in f:
                r = json.loads(line)
                emitted.add((path.parent.name, r["resourceType"], r["id"]))
    with (tmp_path / "truth" / "facts.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 1000
    for r in rows:
        assert (r["org_id"], r["resource_type"], r["resource_id"]) in emitted
    # a copied problem-list condition is still seen at several sources (EHR + claims ...)
    places: dict[str, set[str]] = {}
    for r in rows:
        if "/cond/" in r["fact_id"]:
            places.setdefault(r["fact_id"], set()).add(r["org_id"])
    assert any(len(v) >= 2 for v in places.values())
    # fact ids carry the copied person id, which the identity truth knows
    with (tmp_path / "truth" / "identity.csv").open() as f:
        persons = {row["person_id"] for row in csv.DictReader(f)}
    assert {r["fact_id"].split("/")[0] for r in rows} <= persons

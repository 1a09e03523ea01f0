"""FHIR checks at the landing door (lib/fhir/validate.py): each rule on its own, and the Python
check (``LakeWriter.add``) and the DuckDB fast path (``add_ndjson_file``) agreeing on every case;
bounded lines and truncated gzip in the line reader."""

import gzip
import json
from collections.abc import Mapping
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medblocks_pipelines.lib.fhir.validate import invalid_reason
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_pipelines.lib.warehouse.ndjson_lines import read_lines

OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}

CASES: list[tuple[dict[str, object], str | None]] = [
    # valid: dates of each precision, an instant with offset, references of each shape
    ({"resourceType": "Patient", "birthDate": "1970"}, None),
    ({"resourceType": "Patient", "birthDate": "1970-02-28", "gender": "other"}, None),
    ({**OBS, "issued": "2026-01-02T03:04:05.5+14:00", "effectiveDateTime": "2026-01"}, None),
    ({**OBS, "subject": {"reference": "https://ehr.example/fhir/Patient/p-1"}}, None),
    ({**OBS, "subject": {"reference": "urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7"}}, None),
    ({**OBS, "valueQuantity": {"value": 7.10}, "meta": {"versionId": "3"}}, None),
    ({"resourceType": "Organization", "name": "not checked beyond meta"}, None),
    # invalid primitives and codes
    ({"resourceType": "Patient", "birthDate": "yesterday"}, "invalid_primitive: Patient.birthDate"),
    (
        {"resourceType": "Patient", "birthDate": "1970-13-01"},
        "invalid_primitive: Patient.birthDate",
    ),
    ({"resourceType": "Patient", "birthDate": 19700101}, "invalid_primitive: Patient.birthDate"),
    ({"resourceType": "Patient", "gender": "banana"}, "invalid_code: Patient.gender"),
    ({"resourceType": "Patient", "active": "true"}, "invalid_primitive: Patient.active"),
    ({**OBS, "issued": "2026-01-02"}, "invalid_primitive: Observation.issued"),  # no time
    ({**OBS, "status": "done"}, "invalid_code: Observation.status"),
    ({**OBS, "valueQuantity": {"value": "7.1"}}, "invalid_primitive: Observation.valueQuantity"),
    ({**OBS, "subject": {"reference": "Patient/has space"}}, "invalid_primitive: Observation.subj"),
    ({**OBS, "meta": {"lastUpdated": "2026-01-01"}}, "invalid_primitive: Observation.meta.last"),
    # required elements
    ({"resourceType": "Observation", "status": "final"}, "missing_required: Observation.code"),
    ({"resourceType": "Condition", "code": {"text": "x"}}, "missing_required: Condition.subject"),
    (
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/1"},
        },
        "missing_required: MedicationRequest.medicationCodeableConcept/medicationReference",
    ),  # fmt: skip
    ({"resourceType": "Coverage", "status": "active", "payor": []}, "missing_required: Coverage.b"),
    # type and id
    ({"resourceType": "NotAType"}, "unknown_resource_type: "),
    ({"resourceType": "Patient", "id": "has space"}, "invalid_id: "),
    ({"resourceType": "Patient", "id": "x" * 65}, "invalid_id: "),
    ({**OBS, "id": "in-the-wrong-file", "resourceType": "Encounter"}, "type_mismatch: "),
]


def _line(i: int, res: Mapping[str, object]) -> str:
    return json.dumps({"id": f"r{i}", **res})


@pytest.mark.parametrize(("res", "expected"), CASES)
def test_rule(res: dict[str, object], expected: str | None) -> None:
    got = invalid_reason(json.loads(_line(0, res)), expected_type=None)
    if expected and expected.startswith("type_mismatch"):
        got = invalid_reason(json.loads(_line(0, res)), expected_type="Observation")
    assert (got is None) if expected is None else (got or "").startswith(expected), got


def _quarantined(root: Path) -> dict[int, str]:
    out = {}
    for f in root.rglob("quarantine/**/*.parquet"):
        for row in pq.read_table(f).to_pylist():
            out[int(row["origin"].rsplit("#", 1)[-1].rsplit(":", 1)[-1])] = row["reason"]
    return out


def test_fast_path_and_python_agree(tmp_path: Path) -> None:
    """The same file through DuckDB and line by line: the same rows land, the same reasons."""
    lines = [_line(i, res) for i, (res, _) in enumerate(CASES)]
    f = tmp_path / "mixed.ndjson"
    f.write_text("\n".join(lines) + "\n")
    prov = Provenance("t", "backend", "s", None, None, "r")
    with LakeWriter(tmp_path / "fast", prov) as fast:
        fast.add_ndjson_file(f, expected_type=None)
    with LakeWriter(tmp_path / "slow", prov) as slow:
        for n, line in enumerate(lines, start=1):
            slow.add(line, origin=f"x:{n}")
    valid = sum(e is None for _, e in CASES)
    assert fast.stats.landed == slow.stats.landed == valid
    got_fast, got_slow = _quarantined(tmp_path / "fast"), _quarantined(tmp_path / "slow")
    assert got_fast == got_slow
    assert len(got_fast) == len(CASES) - valid


def test_expected_type_on_both_paths(tmp_path: Path) -> None:
    f = tmp_path / "Observation.ndjson"
    f.write_text(_line(1, OBS) + "\n" + _line(2, {"resourceType": "Patient"}) + "\n")
    prov = Provenance("t", "backend", "s", None, None, "r")
    with LakeWriter(tmp_path / "lake", prov) as w:
        w.add_ndjson_file(f, expected_type="Observation")
        assert not w.add(_line(3, {"resourceType": "Patient"}), expected_type="Observation")
    assert w.stats.counts_by_type == {"Observation": 1}
    assert w.stats.quarantine_reasons == {"type_mismatch": 2}


def test_fast_path_line_limit(tmp_path: Path) -> None:
    """A line over the writer's limit that DuckDB can read is quarantined in SQL, head kept."""
    f = tmp_path / "Patient.ndjson"
    big = _line(2, {"resourceType": "Patient", "text": {"div": "y" * 5000}})
    f.write_text("\n".join([_line(1, {"resourceType": "Patient"}), big]) + "\n")
    prov = Provenance("t", "backend", "s", None, None, "r")
    with LakeWriter(tmp_path / "lake", prov, max_line_bytes=1000) as w:
        w.add_ndjson_file(f)
    assert w.stats.landed == 1
    assert _quarantined(tmp_path / "lake")[2].startswith("line_too_long: record 2 has ")


def test_read_lines_bounds_and_truncation(tmp_path: Path) -> None:
    f = tmp_path / "a.ndjson"
    f.write_bytes(b"one\n" + b"z" * 5000 + b"\n\nthree\n" + b"z" * 3000)
    got = [
        (x.lineno, x.data[:5], (x.problem or "").split(":")[0])
        for x in read_lines(f, max_line=100, keep=5)
    ]
    assert got == [
        (1, b"one", ""),
        (2, b"zzzzz", "line_too_long"),
        (4, b"three", ""),
        (5, b"zzzzz", "line_too_long"),
    ]
    # A gzip cut exactly at a line boundary: every line, then one truncated_gzip event.
    data = gzip.compress(b"a\nb\n")
    g = tmp_path / "b.ndjson.gz"
    g.write_bytes(data[:-8])  # the CRC and size trailer gone
    events = [(x.lineno, x.data, x.problem is not None) for x in read_lines(g)]
    assert events == [(1, b"a", False), (2, b"b", False), (3, b"", True)]

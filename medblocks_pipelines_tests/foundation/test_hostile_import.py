"""A hostile NDJSON import through the Dagster asset the CLI runs (``backend/ndjson_import``): real
files on disk mixing 1,000+ good records with a 50 MB line, a truncated ``.ndjson.gz``, latin-1
bytes, invalid FHIR (a date, a code, an unknown type, an id with spaces), a resource in the wrong
file and a conflicting duplicate. Every good record lands and reaches the warehouse; each bad one is
quarantined with its reason; the counts (and no raw value) are in the Dagster metadata."""

import json
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.shared.import_assets import ndjson_import
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse


def _patient(i: int, **extra: object) -> str:
    return json.dumps(
        {"resourceType": "Patient", "id": f"p{i}", "gender": "female", "birthDate": "1970-01-0"
         f"{1 + i % 9}", **extra}
    )  # fmt: skip


def _obs(i: int, value: float = 7.1, version: str | None = None) -> str:
    res: dict[str, object] = {
        "resourceType": "Observation",
        "id": f"o{i}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/p{i % 300}"},
        "effectiveDateTime": "2026-01-02T03:04:05Z",
        "valueQuantity": {"value": value, "unit": "/min"},
    }
    if version:
        res["meta"] = {"versionId": version, "lastUpdated": "2026-01-02T03:04:05.123+01:00"}
    return json.dumps(res)


def _cond(i: int, note: str = "") -> str:
    res: dict[str, object] = {
        "resourceType": "Condition",
        "id": f"c{i}",
        "subject": {"reference": f"Patient/p{i}"},
        "onsetDateTime": "2019-05",
    }
    if note:
        res["note"] = [{"text": note}]
    return json.dumps(res)


def _lines(path: Path, lines: Sequence[str | bytes]) -> None:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))


def _readable_lines(data: bytes) -> tuple[int, bool]:
    """Whole lines a gzip prefix decompresses to, and whether a partial line follows (zlib)."""
    out = zlib.decompressobj(wbits=31).decompress(data)
    return out.count(b"\n"), not out.endswith(b"\n")


def _hostile_folder(tmp: Path) -> tuple[Path, int, Counter[str]]:
    """The export folder, the number of good records in it, the expected quarantine reasons."""
    folder = tmp / "export"
    folder.mkdir()
    good = 0
    bad: Counter[str] = Counter()

    # Fast path (valid UTF-8 throughout): invalid FHIR and a resource in the wrong file.
    lines = [_patient(i) for i in range(300)]
    lines[10] = _patient(10, birthDate="yesterday")
    lines[20] = _patient(20, gender="banana")
    lines[30] = json.dumps({"resourceType": "NotAType", "id": "x1"})
    lines[40] = json.dumps({"resourceType": "Patient", "id": "john smith"})
    lines[50] = _obs(9999)  # an Observation in the Patient file
    _lines(folder / "Patient.000.ndjson", lines)
    good += 295
    bad.update(["invalid_primitive", "invalid_code", "unknown_resource_type", "invalid_id"])
    bad["type_mismatch"] += 1

    # Line by line (latin-1 bytes make DuckDB refuse the file): the good lines around still land.
    lines2: list[str | bytes] = [_patient(i) for i in range(300, 500)]
    lines2.insert(77, b'{"resourceType":"Patient","id":"p-latin","name":[{"family":"M\xfcller"}]}')
    _lines(folder / "Patient.001.ndjson", lines2)
    good += 200
    bad["invalid_utf8"] += 1

    # A conflicting duplicate: same type, id and versionId, other content; the first one lands.
    lines3 = [_obs(i, version="1") for i in range(400)]
    lines3.append(_obs(5, value=99.0, version="1"))
    lines3.append(_obs(6, version="1"))  # an exact duplicate: not a conflict
    _lines(folder / "Observation.000.ndjson", lines3)
    good += 401
    bad["conflicting_duplicate"] += 1

    # A 50 MB line amid good conditions.
    lines4 = [_cond(i) for i in range(100)]
    lines4.insert(50, _cond(100, note="x" * (50 * 1024 * 1024)))
    _lines(folder / "Condition.ndjson", lines4)
    good += 100
    bad["line_too_long"] += 1

    # A truncated gzip: 100 good records, a flush point, then records cut off mid-stream.
    comp = zlib.compressobj(wbits=31)
    head = "".join(_obs(1000 + i) + "\n" for i in range(100)).encode()
    data = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = "".join(_obs(2000 + i) + "\n" for i in range(2000)).encode()
    rest = comp.compress(tail) + comp.flush()
    cut = data + rest[: len(rest) // 2]
    (folder / "Observation.001.ndjson.gz").write_bytes(cut)
    whole, partial = _readable_lines(cut)
    assert whole >= 100 and partial  # the test cuts inside a line
    good += whole
    bad["truncated_gzip"] += 1
    return folder, good, bad


def test_hostile_import_lands_every_good_record(settings: Settings, tmp_path: Path) -> None:
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme")
    cp.add_source("mercy-ehr", "Mercy", "epic", "ehr", "http://x", ["backend"])
    cp.add_organization("mercy", "acme", "mercy-ehr", "Mercy General")
    folder, good, bad = _hostile_folder(tmp_path)
    assert good >= 972

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("backend_orgs", ["acme.mercy"])
        res = dg.materialize(
            [ndjson_import],
            partition_key="acme.mercy",
            instance=instance,
            resources={"platform": PlatformResource()},
            run_config={"ops": {"backend__ndjson_import": {"config": {"path": str(folder)}}}},
        )
    assert res.success
    (mat,) = res.asset_materializations_for_node("backend__ndjson_import")
    md = mat.metadata
    assert md["files_read"].value == 5
    assert md["landed"].value == good
    assert md["quarantined"].value == sum(bad.values())
    assert md["quarantine_reasons"].value == dict(bad)
    # Counts only: no raw value of a bad record reaches the metadata.
    text = json.dumps({k: str(v.value) for k, v in md.items()})
    for value in ("yesterday", "banana", "john smith", "NotAType", "ller"):
        assert value not in text

    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        by_type = dict(
            con.execute("SELECT resource_type, count(*) FROM resources GROUP BY ALL").fetchall()
        )
        assert sum(by_type.values()) == good - 1  # the exact duplicate is one resource
        assert set(by_type) == {"Patient", "Observation", "Condition"}
        p10: Any = con.execute(
            "SELECT count(*) FROM resources WHERE resource_id = 'p10'"
        ).fetchone()
        assert p10[0] == 0
        # The conflicting duplicate: the first content stays, the other is in quarantine.
        o5: Any = con.execute(
            "SELECT resource ->> '$.valueQuantity.value' FROM resources WHERE resource_id = 'o5'"
        ).fetchall()
        assert [float(v) for (v,) in o5] == [7.1]
        reasons = dict(con.execute("SELECT origin, reason FROM quarantine").fetchall())
    assert reasons["Patient.000.ndjson#11"] == (
        'invalid_primitive: Patient.birthDate: "yesterday" is not a FHIR date'
    )
    assert reasons["Patient.000.ndjson#21"].startswith('invalid_code: Patient.gender: "banana"')
    assert reasons["Patient.000.ndjson#31"].startswith('unknown_resource_type: "NotAType"')
    assert reasons["Patient.000.ndjson#41"].startswith('invalid_id: "john smith"')
    assert reasons["Patient.000.ndjson#51"] == "type_mismatch: a Observation in a file of Patient"
    assert reasons["Patient.001.ndjson:78"].startswith("invalid_utf8: byte ")
    assert reasons["Observation.000.ndjson#401"].startswith("conflicting_duplicate: Observation/o5")
    # (DuckDB refuses an object this large, so the file is read line by line.)
    assert reasons["Condition.ndjson:51"].startswith("line_too_long: line 51 has ")
    assert any(
        o.startswith("Observation.001.ndjson.gz:") and r.startswith("truncated_gzip")
        for o, r in reasons.items()
    )

"""Write warehouse files with just the tables the CDS index reads (tests and the benchmark).

:func:`write_warehouse` takes explicit rows; :func:`write_synthetic_warehouse` generates ``persons``
people in SQL (seconds for 100k). Both publish like the real build: a temporary file in the same
folder, then an atomic rename.
"""

import os
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

FACT_COLUMNS: dict[str, Any] = {
    "person_id": pl.Utf8,
    "fact_id": pl.Utf8,
    "kind": pl.Utf8,
    "code_system": pl.Utf8,
    "code": pl.Utf8,
    "display": pl.Utf8,
    "text": pl.Utf8,
    "effective_date": pl.Date,
    "last_date": pl.Date,
    "value_num": pl.Float64,
    "value_unit": pl.Utf8,
    "value_text": pl.Utf8,
    "status": pl.Utf8,
    "category": pl.Utf8,
    "sources": pl.List(pl.Utf8),
    "patterns": pl.List(pl.Utf8),
    "from_claims": pl.Boolean,
}


def _publish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def _pattern(fact: Mapping[str, Any]) -> str | None:
    return (fact.get("patterns") or [None])[0]


def write_warehouse(
    path: Path,
    *,
    links: Sequence[Mapping[str, Any]],
    facts: Sequence[Mapping[str, Any]],
    patients: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Publish a warehouse with ``patient_links`` (patient_key, source, person_id), ``resources``
    (Patient JSON per patient_key), ``facts`` (+ ``organizations``, ``codes``, and for network
    facts ``permitted_purpose``, default ``T-TREAT``) at ``path``."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    link_df = pl.DataFrame(
        [
            {
                "patient_key": r["patient_key"],
                "source": r["source"],
                "person_id": r["person_id"],
                "pattern": r.get("pattern", "backend"),
                "organization": r.get("organization"),
            }
            for r in links
        ],
        schema={
            "patient_key": pl.Utf8,
            "source": pl.Utf8,
            "person_id": pl.Utf8,
            "pattern": pl.Utf8,
            "organization": pl.Utf8,
        },
    )
    res_df = pl.DataFrame(
        [
            {
                "resource_key": p["patient_key"],
                "resource_type": "Patient",
                "resource": json.dumps(p["resource"]),
            }
            for p in patients
        ],
        schema={"resource_key": pl.Utf8, "resource_type": pl.Utf8, "resource": pl.Utf8},
    )
    fact_df = pl.DataFrame(
        [{k: f.get(k) for k in FACT_COLUMNS} for f in facts], schema=FACT_COLUMNS
    )
    src_df = pl.DataFrame(
        [
            {
                "fact_id": f["fact_id"],
                "organization": o,
                "pattern": _pattern(f),
                # network facts: the purpose they were obtained for (default treatment) and a
                # query id, as the real build carries them
                "permitted_purpose": f.get("permitted_purpose", "T-TREAT")
                if _pattern(f) == "network"
                else None,
                "network_query_id": f"q-{f['fact_id']}" if _pattern(f) == "network" else None,
            }
            for f in facts
            for o in (f.get("organizations") or [None])
        ],
        schema={
            "fact_id": pl.Utf8,
            "organization": pl.Utf8,
            "pattern": pl.Utf8,
            "permitted_purpose": pl.Utf8,
            "network_query_id": pl.Utf8,
        },
    )
    men_df = pl.DataFrame(
        [{"fact_id": f["fact_id"], "codes": list(f.get("codes") or [])} for f in facts],
        schema={"fact_id": pl.Utf8, "codes": pl.List(pl.Utf8)},
    )
    con = duckdb.connect(str(tmp))
    try:
        con.register("link_df", link_df.to_arrow())
        con.register("res_df", res_df.to_arrow())
        con.register("fact_df", fact_df.to_arrow())
        con.register("src_df", src_df.to_arrow())
        con.register("men_df", men_df.to_arrow())
        con.execute("CREATE TABLE patient_links AS SELECT * FROM link_df")
        con.execute("CREATE TABLE resources AS SELECT * FROM res_df")
        con.execute("CREATE TABLE facts AS SELECT * FROM fact_df")
        con.execute("CREATE TABLE fact_sources AS SELECT *, now() AS fetched_at FROM src_df")
        con.execute("CREATE TABLE fact_mentions AS SELECT * FROM men_df")
        con.execute("CREATE TABLE build_info AS SELECT 'synthetic' AS tenant, now() AS built_at")
    finally:
        con.close()
    _publish(tmp, path)
    return path


def write_synthetic_warehouse(
    path: Path, *, persons: int, here: str = "ehr-a", today: date | None = None
) -> Path:
    """Publish ``persons`` people known at ``here``, another EHR and a payer, ~10 facts each.

    Person ``i``: ``{here}/Patient/a{i}``; every third is diabetic with an HbA1c ``i % 400`` days
    old at ``ehr-b``; every fifth has a penicillin allergy at ``ehr-b``; every seventh takes
    simvastatin per the payer; six encounters and a lipid panel at ``ehr-b``.
    """
    today = today or date.today()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute("SET preserve_insertion_order = false")
        con.execute(f"CREATE TEMP TABLE ids AS SELECT range AS i FROM range({int(persons)})")
        con.execute(
            """
            CREATE TABLE patient_links AS
            SELECT s.source || '/Patient/' || s.prefix || i AS patient_key, s.source,
                   'p' || i AS person_id, 'backend' AS pattern, s.source AS organization
            FROM ids, (VALUES (?, 'a'), ('ehr-b', 'b'), ('payer-x', 'm')) s(source, prefix)
            """,
            [here],
        )
        con.execute(
            """
            CREATE TABLE resources AS
            SELECT patient_key AS resource_key, 'Patient' AS resource_type,
                   '{"resourceType":"Patient","identifier":[{"system":"urn:mrn:' || source
                   || '","value":"' || split_part(patient_key, '/', 3) || '"}]}' AS resource
            FROM patient_links
            """
        )
        con.execute(
            f"""
            CREATE TABLE facts AS
            WITH base AS (SELECT i, DATE '{today.isoformat()}' AS today FROM ids)
            SELECT 'p' || i AS person_id, 'dm' || i AS fact_id, 'condition' AS kind,
                   'http://snomed.info/sct' AS code_system, '44054006' AS code,
                   'Diabetes mellitus type 2' AS display, NULL AS text,
                   today - 900 AS effective_date, today - 30 AS last_date, NULL::DOUBLE AS value_num,
                   NULL AS value_unit, NULL AS value_text, 'active' AS status,
                   'problem-list-item' AS category, ['ehr-b'] AS sources, ['backend'] AS patterns,
                   false AS from_claims
            FROM base WHERE i % 3 = 0
            UNION ALL
            SELECT 'p' || i, 'a1c' || i, 'result', 'http://loinc.org', '4548-4', 'Hemoglobin A1c',
                   NULL, today - (i % 400)::INT, today - (i % 400)::INT, 7.1, '%', NULL, 'final',
                   'laboratory', ['ehr-b'], ['backend'], false
            FROM base WHERE i % 3 = 0
            UNION ALL
            SELECT 'p' || i, 'pen' || i, 'allergy', 'http://www.nlm.nih.gov/research/umls/rxnorm',
                   '70618', 'penicillin', NULL, today - 2000, today - 2000, NULL, NULL, NULL,
                   'active', 'medication', ['ehr-b'], ['patient_access'], false
            FROM base WHERE i % 5 = 0
            UNION ALL
            SELECT 'p' || i, 'simva' || i, 'medication',
                   'http://www.nlm.nih.gov/research/umls/rxnorm', '36567', 'simvastatin', NULL,
                   today - 200, today - 20, NULL, NULL, NULL, 'active', NULL, ['payer-x'],
                   ['patient_access'], true
            FROM base WHERE i % 7 = 0
            UNION ALL
            SELECT 'p' || i, 'lipid' || i, 'result', 'http://loinc.org', '2093-3', 'Cholesterol',
                   NULL, today - 10, today - 10, 190, 'mg/dL', NULL, 'final', 'laboratory',
                   ['ehr-b'], ['backend'], false
            FROM base
            UNION ALL
            SELECT 'p' || i, 'enc' || i || '-' || k, 'encounter', 'http://snomed.info/sct',
                   '185349003', 'Encounter for check up', NULL, today - (60 * k)::INT, today - (60 * k)::INT,
                   NULL, NULL, NULL, 'finished', NULL, ['ehr-b'], ['backend'], false
            FROM base, range(6) r(k)
            """
        )
        con.execute(
            """
            CREATE TABLE fact_sources AS
            SELECT fact_id, sources[1] AS organization, patterns[1] AS pattern,
                   now() AS fetched_at FROM facts
            """
        )
        con.execute(
            "CREATE TABLE fact_mentions AS SELECT fact_id, [code_system || '|' || code] AS codes "
            "FROM facts"
        )
        con.execute("CREATE TABLE build_info AS SELECT 'synthetic' AS tenant, now() AS built_at")
    finally:
        con.close()
    _publish(tmp, path)
    return path

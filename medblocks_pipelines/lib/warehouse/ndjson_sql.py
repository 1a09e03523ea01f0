"""The NDJSON fast path's SQL: one DuckDB pass reads a file, extracts what the lake needs and what
the FHIR checks read, and marks each row's reason (``LakeWriter.add_ndjson_file``).

The temporary table ``rows`` holds ``raw, recno, reason, suspect, rtype, rid, vid, lu, h``
(``h``: the md5 of ``raw``, the lake's content hash, computed once); rows with a NULL reason land. ``suspect`` rows (rejected by ``validate.valid_sql``) get their reason
worded by ``validate.invalid_reason``; later rows of a (type, id, versionId) whose content differs
from the first one's are flagged as conflicting duplicates.
"""

import json
from pathlib import Path

import duckdb
import pyarrow as pa

from medblocks_pipelines.lib.fhir import validate


def _sql_str(value: str) -> str:
    return value.replace("'", "''")


def rows_sql(
    path: Path, max_line_bytes: int, validate_: bool, expected_type: str | None, first: int = 0
) -> str:
    """The statement that creates ``rows`` from one NDJSON file (each line parsed once); record
    numbers start after ``first`` (the records of a file's earlier chunks)."""
    # json_extract gives JSON texts: a string starts with '"'; anything else (a number,
    # an object, null) is as unusable for resourceType/id as no value. ->> '$' unquotes.
    paths = ["$.resourceType", "$.id", "$.meta.versionId", "$.meta.lastUpdated"]
    valid = "true"
    if validate_:
        paths += [f"$.{p}" for p in validate.checked_paths(expected_type)]
        valid = validate.valid_sql("f", 5, "rtype", expected_type)
    return f"""
        CREATE TEMP TABLE rows AS
        SELECT raw, recno,
               CASE WHEN raw IS NULL THEN 'malformed JSON'
                    WHEN strlen(raw) > {int(max_line_bytes)} THEN 'line_too_long: record '
                         || recno || ' has ' || strlen(raw) || ' bytes (limit '
                         || {int(max_line_bytes)} || ')'
                    WHEN NOT starts_with(ltrim(raw), '{{') THEN 'not a JSON object'
                    WHEN f[1] IS NULL OR NOT starts_with(f[1], '"')
                         OR f[1] = '""' THEN 'missing resourceType'
                    WHEN f[2] IS NULL OR NOT starts_with(f[2], '"')
                         OR f[2] = '""' THEN 'missing id'
               END AS reason,
               -- the FHIR checks; a rejected row gets its reason from validate.invalid_reason
               NOT coalesce({valid}, false) AS suspect,
               rtype, rid, vid, lu, md5(raw) AS h
        FROM (
            SELECT raw, recno, f, f[1] ->> '$' AS rtype, f[2] ->> '$' AS rid,
                   CASE WHEN f[3] <> 'null' THEN f[3] ->> '$' END AS vid,
                   CASE WHEN f[4] <> 'null' THEN f[4] ->> '$' END AS lu
            FROM (
                -- VARCHAR[]: the JSON text of each value (checks never re-parse it)
                SELECT json::VARCHAR AS raw, json_extract(json, {paths!r})::VARCHAR[] AS f,
                       row_number() OVER () + {int(first)} AS recno
                FROM read_ndjson_objects('{_sql_str(str(path))}', ignore_errors=true)
            )
        )
        """


def explain_rejected(con: duckdb.DuckDBPyConnection, expected_type: str | None) -> None:
    """Word the reason of each row the SQL checks rejected (few: per-row Python is fine)."""
    cur = con.execute("SELECT recno, raw FROM rows WHERE reason IS NULL AND suspect ORDER BY recno")
    recnos: list[int] = []
    reasons: list[str] = []
    while batch := cur.fetchmany(10_000):
        for recno, raw in batch:
            try:
                reason = validate.invalid_reason(json.loads(raw), expected_type)
            except ValueError as exc:  # JSON DuckDB reads and Python does not
                reason = f"malformed JSON: {exc}"
            if reason:
                recnos.append(recno)
                reasons.append(reason)
    if recnos:
        fixes = pa.table({"f_recno": recnos, "f_reason": reasons})  # noqa: F841 (used in SQL)
        con.execute("UPDATE rows SET reason = f_reason FROM fixes WHERE rows.recno = fixes.f_recno")


def flag_conflicts(con: duckdb.DuckDBPyConnection) -> None:
    """Quarantine later rows of a (type, id, versionId) whose content differs from the first.

    Deterministic (file order decides which lands), flagged, never resolved silently. The
    hashes are compared only for keys seen more than once, so a clean file pays one GROUP BY.
    """
    con.execute(
        f"""
        UPDATE rows SET reason = {CONFLICT_SQL}
        FROM (
            SELECT recno AS c_recno FROM (
                SELECT recno, h,
                       first_value(h) OVER (
                           PARTITION BY rtype, rid, vid ORDER BY recno) AS h0
                FROM rows
                WHERE reason IS NULL AND vid IS NOT NULL
                  AND (rtype, rid, vid) IN (
                      SELECT (rtype, rid, vid) FROM rows
                      WHERE reason IS NULL AND vid IS NOT NULL
                      GROUP BY ALL HAVING count(*) > 1)
            ) WHERE h <> h0
        ) c
        WHERE rows.recno = c.c_recno
        """
    )


def conflict_text(rtype: str, rid: str, vid: str) -> str:
    """The reason of a conflicting duplicate (the same words as ``CONFLICT_SQL``)."""
    return (
        f"conflicting_duplicate: {rtype}/{rid} versionId {vid} differs from an earlier line "
        "of the same file"
    )


CONFLICT_SQL = (
    "'conflicting_duplicate: ' || rows.rtype || '/' || rows.rid || ' versionId ' || rows.vid "
    "|| ' differs from an earlier line of the same file'"
)

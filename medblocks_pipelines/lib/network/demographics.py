"""Who a query is about: the person's other ids and the demographics XCPD matches on, read from
our own warehouse or lake, never from the network."""

from typing import Any

from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.settings import Settings


def _warehouse_rows(
    settings: Settings, tenant: str, sql: str, params: list[Any]
) -> list[tuple[Any, ...]]:
    """Rows from the tenant's published warehouse, or nothing if it or the tables are missing."""
    import duckdb

    from medblocks_pipelines.lib.warehouse.build import current_warehouse_path

    path = current_warehouse_path(settings, tenant)
    if not path.exists():
        return []
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return []
    try:
        return con.execute(sql, params).fetchall()
    except duckdb.Error:
        return []
    finally:
        con.close()


def person_aliases(settings: Settings, *, tenant: str, person: str) -> set[str]:
    """``person`` plus the ids of the source patients the warehouse links to it.

    Connections carry the source's patient id (an EHR launch's patient); the unified record's
    person links many of them. Either may be what the caller calls "person".
    """
    rows = _warehouse_rows(
        settings,
        tenant,
        "SELECT r.resource_id FROM patient_links l JOIN resources r ON r.resource_key = l.patient_key "
        "WHERE l.person_id = ?",
        [person],
    )
    return {person, *(str(r[0]) for r in rows)}


def resolve_demographics(
    settings: Settings, *, tenant: str, person: str
) -> ihe.Demographics | None:
    """Find ``person``'s demographics for XCPD, never from the network itself.

    First the warehouse (a Patient linked to the person, or a Patient with that id or resource key
    ``source/Patient/id``), newest first; then the lake (the newest landed Patient with that id or
    key), for a person not yet in a build.
    """
    import json

    import duckdb

    from medblocks_pipelines.lib.warehouse.lake import resources_glob

    rows = _warehouse_rows(
        settings,
        tenant,
        "SELECT r.resource FROM resources r LEFT JOIN patient_links l ON l.patient_key = r.resource_key "
        "WHERE r.resource_type = 'Patient' AND r.pattern <> 'network' "
        "AND (l.person_id = ? OR r.resource_id = ? OR r.resource_key = ?) "
        "ORDER BY r.fetched_at DESC LIMIT 1",
        [person, person, person],
    )
    if rows:
        return ihe.Demographics.from_patient(json.loads(rows[0][0]))
    if settings.lake_url:
        from medblocks_pipelines.lib.warehouse.lake import mirror_tenant

        mirror_tenant(settings.lake_url, settings.lake_root, tenant)
    pattern = resources_glob(settings.lake_root, tenant)
    con = duckdb.connect()
    try:
        row = con.execute(
            "SELECT resource FROM read_parquet(?, hive_partitioning=true, union_by_name=true) "
            "WHERE resource_type = 'Patient' AND NOT deleted AND pattern <> 'network' "
            "AND (resource_id = ? OR source || '/Patient/' || resource_id = ?) "
            "ORDER BY fetched_at DESC LIMIT 1",
            [pattern, person, person],
        ).fetchone()
    except duckdb.Error:
        return None
    finally:
        con.close()
    return ihe.Demographics.from_patient(json.loads(row[0])) if row else None

"""The warehouse step: link the tenant's source patients and write the identity tables."""

from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from medblocks_pipelines.lib.warehouse.identity.cluster import (
    IdentityOptions,
    IdentityResult,
    link_patients,
)
from medblocks_pipelines.lib.warehouse.identity.extract import (
    RAW_COLUMNS,
    connection_patient_keys,
    extract_source_patients,
    patient_refs_from_control_plane,
)


def write_identity_tables(con: duckdb.DuckDBPyConnection, result: IdentityResult) -> None:
    """Create ``persons``, ``patient_links`` and ``identity_edges`` from a result (Arrow, no copy)."""
    persons = result.persons.to_arrow()  # noqa: F841
    links = result.links.to_arrow()  # noqa: F841
    edges = result.edges.to_arrow()  # noqa: F841
    model = result.model.to_arrow()  # noqa: F841
    con.execute("CREATE OR REPLACE TABLE persons AS SELECT * FROM persons ORDER BY person_id")
    con.execute("CREATE OR REPLACE TABLE patient_links AS SELECT * FROM links ORDER BY patient_key")
    con.execute(
        "CREATE OR REPLACE TABLE identity_edges AS SELECT * FROM edges ORDER BY key_l, key_r, rule"
    )
    # the fitted parameters (m, u, weight per level), lambda, the chosen threshold: no data
    con.execute("CREATE OR REPLACE TABLE identity_model AS SELECT * FROM model")


def ensure_landed_patterns(con: duckdb.DuckDBPyConnection) -> bool:
    """Create temp table ``landed_patterns`` (resource_key -> every pattern it arrived through).

    The ``resources`` table keeps one row per resource at a source, with the pattern of its latest
    version; the same Patient read through backend sync and through a patient's portal connection is
    one row. The lake (the build's ``lake_rows``) remembers every landing. False without a lake.
    """
    try:
        con.execute(
            """
            CREATE OR REPLACE TEMP TABLE landed_patterns AS
            SELECT source || '/' || resource_type || '/' || resource_id AS resource_key,
                   list_sort(list(DISTINCT pattern)) AS patterns
            FROM lake_rows WHERE NOT deleted
            GROUP BY 1
            """
        )
    except duckdb.CatalogException:
        return False
    return True


def apply_landed_patterns(con: duckdb.DuckDBPyConnection) -> None:
    """Widen ``patient_links`` (``patterns_seen``) and ``persons.patterns`` to every landing."""
    if not ensure_landed_patterns(con):
        con.execute(
            "CREATE OR REPLACE TABLE patient_links AS SELECT *, [pattern] AS patterns_seen "
            "FROM patient_links ORDER BY patient_key"
        )
        return
    con.execute(
        """
        CREATE OR REPLACE TABLE patient_links AS
        SELECT l.*, coalesce(lp.patterns, [l.pattern]) AS patterns_seen
        FROM patient_links l LEFT JOIN landed_patterns lp ON lp.resource_key = l.patient_key
        ORDER BY l.patient_key
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE persons AS
        SELECT p.* REPLACE (coalesce(x.patterns, p.patterns) AS patterns,
                            CAST(coalesce(len(x.patterns), p.n_patterns) AS UINTEGER) AS n_patterns)
        FROM persons p
        LEFT JOIN (
            SELECT person_id, list_sort(list_distinct(flatten(list(patterns_seen)))) AS patterns
            FROM patient_links GROUP BY 1
        ) x USING (person_id)
        ORDER BY person_id
        """
    )


def empty_identity_result() -> IdentityResult:
    """An identity result with no rows (a tenant without Patient resources)."""
    raw = pl.DataFrame(
        schema={c: pl.String for c in RAW_COLUMNS[:-1]} | {"identifiers": pl.List(pl.String)}
    )
    return link_patients(raw)


def identity_step(con: duckdb.DuckDBPyConnection, ctx: Any) -> dict[str, int]:
    """Warehouse step: link the tenant's source patients into persons."""
    raw = extract_source_patients(con)
    cp = getattr(ctx, "control_plane", None)
    refs = patient_refs_from_control_plane(cp, ctx.tenant)
    own = connection_patient_keys(cp, ctx.tenant)
    opts = IdentityOptions(**(getattr(ctx, "options", {}) or {}).get("identity", {}))
    result = link_patients(raw, patient_refs=refs, connection_patients=own, options=opts)
    write_identity_tables(con, result)
    apply_landed_patterns(con)
    return {
        "persons": result.persons.height,
        "patient_links": result.links.height,
        "identity_edges": result.edges.height,
        "identity_model": result.model.height,
    }


def to_arrow(df: pl.DataFrame) -> pa.Table:
    """A Polars frame as an Arrow table (zero-copy where the buffers allow)."""
    return df.to_arrow()

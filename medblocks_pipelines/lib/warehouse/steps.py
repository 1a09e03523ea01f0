"""The warehouse build steps that run after the base tables, in order.

Each step is ``(con, ctx) -> dict[str, int]`` (see :mod:`medblocks_pipelines.lib.warehouse.build`):

1. :func:`views_step` — every ViewDefinition (shipped core views plus the tenant's own, from
   ``MEDBLOCKS_VIEWS_DIR`` or ``ctx.options["views_dir"]``) becomes a table with the provenance columns
   of ``resources``. A view that fails is recorded in ``view_errors`` (name and error class, never data)
   and the build goes on: one bad user view must not take a tenant's warehouse down; the asset check
   on ``view_errors`` makes it visible.
2. :func:`medblocks_pipelines.lib.warehouse.identity.identity_step` — ``persons``, ``patient_links``,
   ``identity_edges``, ``identity_model`` (the fitted parameters and the chosen threshold).
3. :func:`medblocks_pipelines.lib.warehouse.unified.unified_step` — ``fact_mentions``, ``facts``,
   ``fact_sources`` and the ``facts_*`` views.
4. :func:`build_info_step` — ``build_info``: one row describing this build (tenant, run, counts).
"""

import json
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

from medblocks_pipelines.lib.warehouse.build import BuildContext, BuildStep
from medblocks_pipelines.lib.warehouse.identity import identity_step
from medblocks_pipelines.lib.warehouse.unified import unified_step
from medblocks_pipelines.lib.warehouse.views.runner import PROVENANCE_COLUMNS

# base and step tables a user view may not replace
RESERVED_TABLES = frozenset(
    {
        "resources",
        "resource_versions",
        "tombstones",
        "version_conflicts",
        "quarantine",
        "pull_history",
        "persons",
        "patient_links",
        "identity_edges",
        "identity_model",
        "fact_mentions",
        "facts",
        "fact_sources",
        "view_errors",
        "view_tables",
        "build_info",
    }
)

# the provenance columns every view table carries (those `resources` has), plus the resource id:
# the views runner's own list, so `medblocks views run` and the build give the same columns
VIEW_PASSTHROUGH = PROVENANCE_COLUMNS


def _views(ctx: BuildContext) -> dict[str, dict[str, Any]]:
    from medblocks_pipelines.lib.warehouse.views import load_core_views

    user_dir = (ctx.options or {}).get("views_dir")
    return load_core_views(user_dir=user_dir) if user_dir else load_core_views()


def views_step(con: duckdb.DuckDBPyConnection, ctx: BuildContext) -> dict[str, int]:
    """Materialise every ViewDefinition as a table (with provenance passthrough columns)."""
    from medblocks_pipelines.lib.warehouse.views import compile_view

    present = {r[0] for r in con.execute("DESCRIBE resources").fetchall()}
    passthrough = [c for c in dict.fromkeys(VIEW_PASSTHROUGH) if c in present]
    counts: dict[str, int] = {}
    errors: list[dict[str, str]] = []
    tables: list[dict[str, Any]] = []
    for name, view in sorted(_views(ctx).items()):
        if name in RESERVED_TABLES or name.startswith("facts_"):
            errors.append({"view": name, "error": "ReservedName"})
            continue
        try:
            # exact_decimals: each decimal column also as its exact text (<name>_text).
            compiled = compile_view(
                view, table="resources", passthrough_columns=passthrough, exact_decimals=True
            )
            con.execute(f'CREATE OR REPLACE TABLE "{name}" AS {compiled.sql}')
        except Exception as exc:  # noqa: BLE001 - recorded, surfaced by the view_errors check
            errors.append({"view": name, "error": type(exc).__name__})
            continue
        row = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()
        counts[name] = int(row[0]) if row else 0
        tables.append({"view": name, "resource": str(view.get("resource")), "rows": counts[name]})
    err_arrow = pa.Table.from_pylist(  # noqa: F841 (used by name)
        errors, schema=pa.schema([("view", pa.string()), ("error", pa.string())])
    )
    con.execute("CREATE OR REPLACE TABLE view_errors AS SELECT * FROM err_arrow")
    tab_arrow = pa.Table.from_pylist(  # noqa: F841
        tables,
        schema=pa.schema([("view", pa.string()), ("resource", pa.string()), ("rows", pa.int64())]),
    )
    con.execute("CREATE OR REPLACE TABLE view_tables AS SELECT * FROM tab_arrow ORDER BY view")
    counts["view_errors"] = len(errors)
    return counts


def build_info_step(con: duckdb.DuckDBPyConnection, ctx: BuildContext) -> dict[str, int]:
    """One row about this build: tenant, run id, when, and the options used (no data)."""
    info = pa.Table.from_pylist(  # noqa: F841
        [
            {
                "tenant": ctx.tenant,
                "run_id": ctx.run_id,
                "built_at": datetime.now(UTC),
                "options": json.dumps(ctx.options or {}, sort_keys=True, default=str),
            }
        ],
        schema=pa.schema(
            [
                ("tenant", pa.string()),
                ("run_id", pa.string()),
                ("built_at", pa.timestamp("us", tz="UTC")),
                ("options", pa.string()),
            ]
        ),
    )
    con.execute("CREATE OR REPLACE TABLE build_info AS SELECT * FROM info")
    return {"build_info": 1}


STEPS: list[BuildStep] = [views_step, identity_step, unified_step, build_info_step]

"""Which layer of a tenant's warehouse each built table belongs to (pure, no Dagster).

One build (:func:`medblocks_pipelines.lib.warehouse.build.build_warehouse`) makes every layer in one
DuckDB file; Dagster shows the layers as separate assets of one multi-asset, each reporting the
row counts of its own tables:

- ``base_tables``: the lake's latest versions, tombstones, conflicts, sightings, quarantine, pulls;
- ``views``: one table per ViewDefinition plus ``view_errors`` and ``view_tables``;
- ``identity``: ``persons``, ``patient_links``, ``identity_edges``, ``identity_model``;
- ``unified_record``: ``fact_mentions``, ``facts``, ``fact_sources`` and the ``facts_*`` views;
- ``published``: ``build_info`` (the published, quality-checked file as a whole).

A table the build adds later and that is not named here is a ViewDefinition table (the open set).
"""

from collections.abc import Mapping

LAYERS = ("base_tables", "views", "identity", "unified_record", "published")

_FIXED: dict[str, str] = {
    **dict.fromkeys(
        (
            "resources",
            "resource_versions",
            "tombstones",
            "version_conflicts",
            "resource_sightings",
            "quarantine",
            "pull_history",
        ),
        "base_tables",
    ),
    **dict.fromkeys(("view_errors", "view_tables"), "views"),
    # identity_model: the fitted match model (main after the identity package merge)
    **dict.fromkeys(("persons", "patient_links", "identity_edges", "identity_model"), "identity"),
    **dict.fromkeys(("fact_mentions", "facts", "fact_sources"), "unified_record"),
    "build_info": "published",
}


def layer_of(table: str) -> str:
    """The layer ``table`` belongs to."""
    if table in _FIXED:
        return _FIXED[table]
    return "unified_record" if table.startswith("facts_") else "views"


def counts_by_layer(counts: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Split a build's table counts by layer (every layer present, possibly empty)."""
    out: dict[str, dict[str, int]] = {layer: {} for layer in LAYERS}
    for table, n in sorted(counts.items()):
        out[layer_of(table)][table] = int(n)
    return out

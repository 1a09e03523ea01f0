"""The warehouse data dictionary (docs/DATA_DICTIONARY.md), generated.

Two parts: the ViewDefinition tables (from the views engine's ``data_dictionary``) and the tables the
build adds (base, identity, unified record), whose column types are read from a built warehouse and whose
descriptions live here. Regenerate with::

    .venv/bin/python -m medblocks_sandbox.drivers.data_dictionary > docs/DATA_DICTIONARY.md
"""

import duckdb

from medblocks_pipelines.lib.warehouse import identity, unified

# Why a network row was let in; null for the other patterns (their relationship is `pattern`).
PURPOSE_DOCS = {
    "permitted_purpose": "Network rows: the TEFCA Exchange Purpose (XP code, e.g. T-TREAT, "
    "T-PYMNT) the query that obtained the row was allowed for; null for the other patterns. "
    "Consumers (CDS, exports, analysts) read by it: see the read policy, "
    "`lib/warehouse/read-policy-v1.yaml`",
    "network_query_id": "Network rows: our id of the audited network query that obtained the row "
    "(`network_queries.id`, which names its audit row); null for the other patterns",
}

TABLE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "resources": (
        "The latest version of every resource at every source, tombstones applied (base table).",
        {
            "resource_key": "`source/ResourceType/id`: the key every other table points at",
            "resource": "The resource JSON exactly as the source sent it",
            "pattern": "How it reached us: patient_access, clinician_workflow, backend, network",
            "fetched_at": "When we fetched this version (UTC)",
            **PURPOSE_DOCS,
        },
    ),
    "resource_versions": (
        "Every distinct version landed, once: deduplicated by (source, type, id, content hash), "
        "keeping the first fetch, so re-runs change nothing (base table, metadata only).",
        {
            "content_hash": "MD5 of the JSON text as fetched",
            "lake_file": (
                "The lake Parquet file holding this version's JSON "
                "(its object-store URL when the lake is in object storage)"
            ),
            "lake_row": "Row number of the version inside `lake_file`",
            **PURPOSE_DOCS,
        },
    ),
    "tombstones": (
        "Deletions reported by sources (Bulk `deleted`, retractions): a resource whose newest "
        "state is a tombstone is absent from `resources` (base table).",
        {"deleted_at": "When the source says it was deleted (source time)"},
    ),
    "version_conflicts": (
        "Resource versions that arrived with more than one content under the same versionId (a "
        "source changed a resource without a new version): flagged, not resolved; `resources` "
        "keeps the most recently fetched content (base table).",
        {
            "contents": "Number of distinct contents seen for this versionId",
            "origins": "File and line or record of each content, first fetch first",
        },
    ),
    "resource_sightings": (
        "Each current resource with every relationship that delivered it: the same EHR record can "
        "arrive through a backend export and a patient's own connection (base table).",
        {
            "first_fetched_at": "First time this relationship delivered the resource",
            "last_fetched_at": "Most recent delivery",
            "runs": "Number of runs that delivered it",
            "permitted_purpose": "Network deliveries: the exchange purpose they were obtained for",
        },
    ),
    "quarantine": (
        "Records that could not be landed, with the reason and the raw text (capped at 1 MB), "
        "deduplicated across re-runs (base table).",
        {
            "raw": "The payload as received",
            "reason": "Why it was refused: the class before the first colon (malformed JSON, "
            "invalid_primitive, missing_required, invalid_utf8, ...), then the details",
            "origin": "File and line or record number it came from",
            **PURPOSE_DOCS,
        },
    ),
    "pull_history": (
        "One row per pull (per connection, organization export or network query), copied from the "
        "control plane at build time.",
        {
            "status": "running | success | partial | failed",
            "counts": "JSON: resources landed by type",
        },
    ),
    "persons": (
        "One row per person: a cluster of source patients that are the same human (identity). "
        "Demographics are the most common standardised values across its source patients.",
        {
            "person_id": "Stable id: a hash of the cluster's smallest source patient key",
            "n_source_patients": "Source patients linked to this person",
            "n_sources": "Distinct sources that know the person",
            "patterns": "Patterns through which the person's records arrived (every landing, "
            "not only the latest version's)",
            "n_patterns": "Number of distinct patterns",
            "patient_keys": "The linked source patient keys",
            "conflicts": "Vetoed pairs (e.g. twin-like name conflicts) that still ended in this "
            "person through other links: review these",
        },
    ),
    "patient_links": (
        "One row per source patient (a Patient resource at a source) and the person it belongs to, "
        "with the strongest link that put it there.",
        {
            "patient_key": "The Patient's resource_key",
            "person_id": "The person (see `persons`)",
            "rule": "patient_ref | identifier:<system> | ssn+dob | probabilistic | singleton",
            "linked_to": "The other source patient of that link",
            "score": "Match probability of that link (1.0 for deterministic rules and singletons)",
            "match_weight": "log2 Bayes factor of the probabilistic link",
            "evidence": "JSON: per comparison in the model (given, family, dob, sex, address, city, "
            "postcode, phone, email, ssn) the agreement level and its partial match weight",
            "n_links": "Accepted links touching this source patient",
            "patterns_seen": "Every pattern this Patient resource arrived through",
        },
    ),
    "identity_edges": (
        "Every candidate link considered, accepted or vetoed, with its rule, score and evidence.",
        {
            "key_l": "Source patient key (the smaller)",
            "key_r": "Source patient key (the larger)",
            "veto": "Why a probabilistic link was refused (given names conflict, different SSNs, "
            "birth dates conflict, joins a vetoed pair)",
            "accepted": "Whether the link joined the two source patients",
        },
    ),
    "identity_model": (
        "The linkage model fitted on this build's data: m, u and match weight of every comparison "
        "level, the probability two random records match, the chosen threshold (no data).",
        {
            "parameter": "level | probability_two_random_records_match | threshold | "
            "target_precision | trained | household_guard",
            "comparison": "The comparison of a level (given, family, dob, ...)",
            "level": "The level's label (exact, nickname, jaro-winkler>=0.92, ...)",
            "m_probability": "P(level | same person), estimated by EM (starting value if untrained)",
            "u_probability": "P(level | different people), estimated by random sampling",
            "match_weight": "log2(m/u): the level's partial match weight",
            "value": "The value of a scalar parameter",
        },
    ),
    "fact_mentions": (
        "Every statement of a clinical fact by a source: a resource, or one element of a claim "
        "(`element` = diagnosis[i], item[i], billablePeriod). Non-merged rows stay reachable here.",
        {
            "mention_id": "resource_key, plus #element for claim elements",
            "fact_id": "The fact it was matched into (null when its patient is unknown)",
            "kind": "condition, medication, allergy, immunization, result, report, encounter, "
            "procedure",
            "concept": "The concept it was matched on (codes joined across co-occurring codings)",
            "codes": "Normalised `system|code` of the mention",
            "is_claim": "Stated by a claim (ExplanationOfBenefit)",
            "mention_date": "The date the rule compares (onset, effective, start, authored...)",
            **PURPOSE_DOCS,
        },
    ),
    "facts": (
        "The unified record: one row per clinical fact per person, deduplicated across sources. "
        "Per-kind views: " + ", ".join(f"`{v}`" for v in unified.KIND_VIEWS.values()) + ".",
        {
            "fact_id": "Stable id: a hash of the kind and the fact's smallest mention id",
            "person_id": "The person (see `persons`)",
            "code_system": "Preferred code system among the mentions (SNOMED CT, RxNorm, LOINC, "
            "CVX...)",
            "effective_date": "Earliest date stated by any source",
            "last_date": "Latest date stated by any source",
            "n_sources": "Distinct sources stating the fact",
            "patterns": "Patterns through which it was stated (every landing of its sources)",
            "permitted_purposes": "Exchange purposes of its network sources (empty when no "
            "network row states it); a consumer uses a fact only through sources it may read",
            "from_clinical": "Stated by a clinical record",
            "from_claims": "Stated by a claim",
        },
    ),
    "fact_sources": (
        "Provenance links: fact -> every resource (and claim element) that states it, with source, "
        "pattern, organization, connection, fetched_at and run.",
        {
            "pattern": "Pattern of the resource's latest version",
            "patterns_seen": "Every pattern the resource arrived through",
            **PURPOSE_DOCS,
        },
    ),
    "view_tables": ("The ViewDefinition tables built, with their row counts.", {}),
    "view_errors": ("ViewDefinitions that failed to build (name and error class).", {}),
    "build_info": ("One row about the build: tenant, run id, time, options.", {}),
}


def tables_markdown(con: duckdb.DuckDBPyConnection) -> str:
    """The build tables' sections, column types read from ``con`` (a built warehouse)."""
    lines: list[str] = []
    for table, (text, cols) in TABLE_DOCS.items():
        described = con.execute(f'DESCRIBE "{table}"').fetchall()
        lines += [f"## `{table}`", "", text, "", "| column | type | description |", "|---|---|---|"]
        for name, ctype, *_ in described:
            lines.append(f"| `{name}` | {ctype} | {cols.get(name, '')} |")
        lines.append("")
    return "\n".join(lines)


def rules_markdown() -> str:
    """The identity and fact-matching rules, from the modules' documentation."""
    id_doc = (identity.__doc__ or "").split("\n\n", 1)[1].strip()
    return "\n".join(
        [
            "## Identity rules",
            "",
            id_doc,
            "",
            "## Fact matching rules",
            "",
            unified.describe_rules(),
            "",
        ]
    )


def data_dictionary_markdown(con: duckdb.DuckDBPyConnection) -> str:
    """The whole dictionary: build tables, rules, then every ViewDefinition table."""
    from medblocks_pipelines.lib.warehouse.views import data_dictionary, load_core_views

    views_md = data_dictionary(load_core_views(user_dir=None))
    views_body = views_md.split("\n", 2)[2] if views_md.startswith("# ") else views_md
    return "\n".join(
        [
            "# Data dictionary",
            "",
            "Generated by `python -m medblocks_sandbox.drivers.data_dictionary`; do not edit.",
            "Every tenant has one DuckDB file (`data/warehouse/<tenant>.duckdb`) with these tables.",
            "Example queries: `medblocks_pipelines/lib/warehouse/queries/`.",
            "",
            "# Build tables (identity and unified record)",
            "",
            tables_markdown(con),
            rules_markdown(),
            "# ViewDefinition tables",
            "",
            views_body.strip(),
            "",
        ]
    )

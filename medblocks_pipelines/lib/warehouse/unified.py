"""The unified record: clinical facts deduplicated across sources, each with all its provenance.

Every source record that states a fact is a *mention*: a Condition, an Encounter, an Observation, a
DiagnosticReport, an Immunization, a Procedure, a MedicationRequest, an AllergyIntolerance, or one
element of a claim (an ExplanationOfBenefit diagnosis, line item or the claim's encounter). DuckDB pulls
the mentions out of the landed JSON (not the view tables: matching needs every coding of a
CodeableConcept and every claim element); Polars matches them into *facts*; DuckDB stores the tables.

Matching (same person always required; ``person_id`` comes from identity):

see :data:`MATCHING_RULES` (one rule per kind, rendered into docs/DATA_DICTIONARY.md).

Events (everything but problem-list conditions, allergies, social history and active orders) also
obey: one source never states one event twice, so two same-day events at one source are two facts; the
k-th event of a source on that day (by time) pairs with the k-th of the others.

A *concept* is a connected set of codes: two codings in one CodeableConcept (SNOMED CT and ICD-10-CM on
a Condition, SNOMED CT and CPT on a Procedure, RxNorm product and ingredient on an order) are the same
concept, so a claim's ICD-10-CM diagnosis meets an EHR's SNOMED problem once any source of the tenant sent
both codes together. ICD-10 codes are compared without dots, systems by canonical URI (OIDs mapped).

Tables: ``fact_mentions`` (every mention, merged or not: the non-merged rows stay reachable),
``facts`` (one row per fact), ``fact_sources`` (fact -> resource_key, element, provenance) and the views
``facts_conditions``, ``facts_medications``, ``facts_allergies``, ``facts_immunizations``,
``facts_results``, ``facts_reports``, ``facts_encounters``, ``facts_procedures``. Facts are rebuilt
from the current ``resources`` table, where tombstones are already applied, so a fact disappears with
its last source.

The steps: :mod:`~.unified_mentions` (mentions out of the JSON), :mod:`~.unified_codes` (codes and
concepts), :mod:`~.unified_matching` (mentions into facts); this module writes the tables.
"""

import json
from collections.abc import Iterable
from typing import Any

import duckdb
import polars as pl

from medblocks_pipelines.lib.warehouse.unified_matching import build_facts, match_facts
from medblocks_pipelines.lib.warehouse.unified_mentions import extract_mentions

MATCHING_RULES: dict[str, str] = {
    "condition": "same concept; a problem-list condition (or a claim diagnosis of a condition on "
    "the person's problem list) is one fact whatever the dates; otherwise (encounter diagnoses, other "
    "claim diagnoses) onset/billing dates chained within 7 days",
    "medication": "same concept; active orders are one fact; other orders chained within 7 days "
    "(authoredOn)",
    "allergy": "same concept, whatever the dates",
    "immunization": "same vaccine group (CVX, or the CPT of the vaccine product, grouped by vaccine "
    "family), occurrence dates within 1 day",
    "result": "same LOINC concept, same effective day, same value (numbers rounded to 3 decimals, "
    "else the coded/text value, panel components included); social-history observations (smoking "
    "status) are states: same concept and value, whatever the dates",
    "report": "same LOINC panel concept, same effective day",
    "encounter": "same type concept (a claim's first line, the E/M service, against the type codes) "
    "and same start day (a claim's billable period start counts as the start)",
    "procedure": "same concept (a claim line's CPT/HCPCS against the procedure's codes), dates within "
    "1 day",
}

KINDS = (
    "condition",
    "medication",
    "allergy",
    "immunization",
    "result",
    "report",
    "encounter",
    "procedure",
)
KIND_VIEWS = {
    "condition": "facts_conditions",
    "medication": "facts_medications",
    "allergy": "facts_allergies",
    "immunization": "facts_immunizations",
    "result": "facts_results",
    "report": "facts_reports",
    "encounter": "facts_encounters",
    "procedure": "facts_procedures",
}


# --------------------------------------------------------------------------------------------
# the warehouse step


def unified_step(con: duckdb.DuckDBPyConnection, ctx: Any) -> dict[str, int]:
    """Warehouse step: fact mentions, facts, fact sources and the per-kind views."""
    raw = extract_mentions(con)
    person_of = pl.from_arrow(
        con.sql("SELECT patient_key, person_id FROM patient_links").to_arrow_table()
    )
    assert isinstance(person_of, pl.DataFrame)
    mentions = match_facts(raw, person_of)
    facts = build_facts(mentions)
    write_unified_tables(con, mentions, facts)
    return {
        "fact_mentions": mentions.height,
        "facts": facts.height,
    }


def write_unified_tables(
    con: duckdb.DuckDBPyConnection, mentions: pl.DataFrame, facts: pl.DataFrame
) -> None:
    """Create the unified-record tables and views in ``con``."""
    m_arrow = mentions.drop("concept_codings").to_arrow()  # noqa: F841 (used by name in SQL)
    f_arrow = facts.to_arrow()  # noqa: F841
    con.execute(
        """
        CREATE OR REPLACE TABLE fact_mentions AS
        SELECT mention_id, fact_id, kind, person_id, patient_key, resource_key, resource_type,
               element, is_claim, concept, codes, text, day AS mention_date, date_str,
               value_num, value_unit, value_text, status, category, chronic,
               source, pattern, organization, connection, fetched_at, run_id,
               permitted_purpose, network_query_id
        FROM m_arrow ORDER BY mention_id
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE facts AS
        SELECT fact_id, kind, person_id, code_system, code, display, text, concept,
               effective_date, last_date, value_num, value_unit, value_text, status, category,
               n_mentions, n_resources, n_sources, sources, patterns, permitted_purposes,
               from_clinical, from_claims, first_fetched_at, last_fetched_at
        FROM f_arrow ORDER BY kind, person_id, effective_date, fact_id
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE fact_sources AS
        SELECT DISTINCT fact_id, resource_key, element, resource_type, source, pattern,
               organization, connection, fetched_at, run_id, permitted_purpose, network_query_id
        FROM fact_mentions WHERE fact_id IS NOT NULL
        ORDER BY fact_id, resource_key, element
        """
    )
    # the same resource may have arrived through several patterns (see identity.landed_patterns)
    from medblocks_pipelines.lib.warehouse.identity import ensure_landed_patterns

    if ensure_landed_patterns(con):
        con.execute(
            """
            CREATE OR REPLACE TABLE fact_sources AS
            SELECT s.*, coalesce(lp.patterns, [s.pattern]) AS patterns_seen
            FROM fact_sources s LEFT JOIN landed_patterns lp USING (resource_key)
            ORDER BY s.fact_id, s.resource_key, s.element
            """
        )
        con.execute(
            """
            CREATE OR REPLACE TABLE facts AS
            SELECT f.* REPLACE (coalesce(x.patterns, f.patterns) AS patterns)
            FROM facts f LEFT JOIN (
                SELECT fact_id, list_sort(list_distinct(flatten(list(patterns_seen)))) AS patterns
                FROM fact_sources GROUP BY 1
            ) x USING (fact_id)
            ORDER BY f.kind, f.person_id, f.effective_date, f.fact_id
            """
        )
    else:
        con.execute(
            "CREATE OR REPLACE TABLE fact_sources AS SELECT *, [pattern] AS patterns_seen "
            "FROM fact_sources ORDER BY fact_id, resource_key, element"
        )
    for kind, view in KIND_VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM facts WHERE kind = '{kind}'")


def fact_pairs(groups: Iterable[Iterable[str]]) -> set[tuple[str, str]]:
    """Unordered pairs of distinct members within each group (for pairwise evaluation)."""
    out: set[tuple[str, str]] = set()
    for g in groups:
        members = sorted(set(g))
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                out.add((a, b))
    return out


def describe_rules() -> str:
    """The matching rules as markdown (for the data dictionary)."""
    doc = __doc__ or ""
    table = ["| kind | same fact when |", "|---|---|"]
    table += [f"| {kind} | {rule} |" for kind, rule in MATCHING_RULES.items()]
    head = "Matching (same person always required; `person_id` comes from identity):"
    rest = doc[doc.index("Events (everything but") : doc.index("Tables: ")].strip()
    return "\n".join([head, "", *table, "", rest])


def dumps(value: Any) -> str:
    """Stable JSON (sorted keys)."""
    return json.dumps(value, sort_keys=True, default=str)

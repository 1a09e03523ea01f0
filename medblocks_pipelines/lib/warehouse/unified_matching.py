"""Matching mentions into facts (the rules in :data:`~.unified.MATCHING_RULES`), and one row per
fact with the code shown for it."""

import hashlib

import polars as pl

from medblocks_pipelines.lib.errors import WarehouseError
from medblocks_pipelines.lib.warehouse.unified_codes import (
    VACCINE_GROUP_OF,
    codes_long,
    concept_map,
    norm_system,
)

# days between chained mentions of one fact (None: dates do not matter)
WINDOW_DAYS = {
    "condition": 7,
    "medication": 7,
    "allergy": None,
    "immunization": 1,
    "result": 0,
    "report": 0,
    "encounter": 0,
    "procedure": 1,
}
# the code system shown for a fact, in order of preference
PREFERRED_SYSTEMS = {
    "condition": ["http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"],
    "medication": ["http://www.nlm.nih.gov/research/umls/rxnorm"],
    "allergy": ["http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm"],
    "immunization": ["http://hl7.org/fhir/sid/cvx", "http://www.ama-assn.org/go/cpt"],
    "result": ["http://loinc.org"],
    "report": ["http://loinc.org"],
    "encounter": ["http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"],
    "procedure": ["http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"],
}


# --------------------------------------------------------------------------------------------
# matching


def _fact_id(kind: str, first_mention: str) -> str:
    return "fact-" + hashlib.sha256(f"{kind}\x00{first_mention}".encode()).hexdigest()[:16]


def match_facts(mentions: pl.DataFrame, person_of: pl.DataFrame) -> pl.DataFrame:
    """Assign a ``fact_id`` to every mention with a person (rules in :mod:`~.unified`).

    ``mentions`` as from :func:`extract_mentions`; ``person_of`` maps ``patient_key`` -> ``person_id``.
    Returns the mentions with ``mention_id``, ``person_id``, ``concept``, ``day``, ``fact_id``.
    """
    m = mentions.with_columns(
        mention_id=pl.col("resource_key")
        + pl.when(pl.col("element") != "").then("#" + pl.col("element")).otherwise(pl.lit("")),
        day=pl.col("date_str").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False),
    ).join(person_of, on="patient_key", how="left")

    codes = codes_long(m)
    # a claim line is an immunization when its code is a vaccine product, else a procedure
    line_kind = (
        codes.filter(pl.col("kind") == "claim_line")
        .with_columns(
            is_vaccine=pl.col("sc").is_in(list(VACCINE_GROUP_OF)),
        )
        .group_by("mention_id")
        .agg(pl.col("is_vaccine").any())
        .select(
            "mention_id",
            new_kind=pl.when("is_vaccine")
            .then(pl.lit("immunization"))
            .otherwise(pl.lit("procedure")),
        )
    )
    m = (
        m.join(line_kind, on="mention_id", how="left")
        .with_columns(
            kind=pl.when(pl.col("kind") == "claim_line")
            .then(pl.col("new_kind").fill_null("procedure"))
            .otherwise(pl.col("kind"))
        )
        .drop("new_kind")
    )
    codes = codes.drop("kind").join(m.select("mention_id", "kind"), on="mention_id")
    cmap = concept_map(codes)
    concept_of = (
        codes.with_columns(
            concept=(pl.col("kind") + "#" + pl.col("sc")).replace_strict(cmap, default=None)
        )
        .group_by("mention_id")
        .agg(pl.col("concept").drop_nulls().min())
    )
    m = m.join(concept_of, on="mention_id", how="left").with_columns(
        # an encounter without a type code can still meet one on the same day
        concept=pl.when((pl.col("kind") == "encounter") & pl.col("concept").is_null())
        .then(pl.lit("encounter#uncoded"))
        .otherwise(pl.col("concept").fill_null("uncoded:" + pl.col("mention_id"))),
        value_key=pl.when(pl.col("kind") == "result")
        .then(
            pl.coalesce(
                pl.col("value_num").round(3).cast(pl.String), pl.col("value_text"), pl.lit("")
            )
        )
        .otherwise(pl.lit("")),
    )
    # a claim diagnosis of a condition on the person's problem list is that problem
    chronic_keys = (
        m.filter(pl.col("chronic").fill_null(False) & pl.col("person_id").is_not_null())
        .select("kind", "person_id", "concept")
        .unique()
        .with_columns(has_chronic=pl.lit(True))
    )
    m = (
        m.join(chronic_keys, on=["kind", "person_id", "concept"], how="left")
        .with_columns(
            chronic_group=pl.col("has_chronic").fill_null(False)
            & (pl.col("chronic").fill_null(False) | pl.col("is_claim"))
            | (pl.col("kind") == "allergy")
            | ((pl.col("kind") == "result") & pl.col("chronic").fill_null(False))
        )
        .drop("has_chronic")
    )

    with_person = m.filter(pl.col("person_id").is_not_null())
    window = pl.col("kind").replace_strict(
        {k: (v if v is not None else -1) for k, v in WINDOW_DAYS.items()}, return_dtype=pl.Int64
    )
    group_cols = ["kind", "person_id", "concept", "value_key", "chronic_group"]
    ordered = with_person.with_columns(window=window).sort(
        [*group_cols, "day", "mention_id"], nulls_last=True
    )
    gap = pl.col("day").diff().over(group_cols).dt.total_days()
    new_cluster = (
        pl.col("chronic_group").not_()
        & (pl.col("window") >= 0)
        & (gap.is_null() & pl.col("day").is_null() | (gap > pl.col("window")))
    )
    ordered = ordered.with_columns(
        cluster_no=new_cluster.fill_null(False).cast(pl.Int32).cum_sum().over(group_cols)
    )
    # A source never states one event twice: two same-day events of one kind at one source (two
    # visits, two blood draws) are two facts. Within a cluster the k-th event of each source (by
    # time) pairs with the k-th of the others; states (problems, allergies, active orders) are exempt.
    cluster_cols = [*group_cols, "cluster_no"]
    ordered = ordered.with_columns(
        occurrence=pl.when(pl.col("chronic_group"))
        .then(pl.lit(0, dtype=pl.UInt32))
        .otherwise(
            # undated events rank by id, so they are never lost to a null rank
            pl.coalesce(pl.col("date_str"), pl.col("mention_id"))
            .rank("ordinal")
            .over([*cluster_cols, "source", "is_claim"], order_by="mention_id")
            .cast(pl.UInt32)
        )
    )
    cluster_cols = [*cluster_cols, "occurrence"]
    first = ordered.group_by(cluster_cols).agg(first_mention=pl.col("mention_id").min())
    ordered = ordered.join(first, on=cluster_cols, nulls_equal=True).with_columns(
        fact_id=pl.struct("kind", "first_mention").map_batches(
            lambda s: pl.Series(
                [_fact_id(r["kind"], r["first_mention"]) for r in s.to_list()], dtype=pl.String
            ),
            return_dtype=pl.String,
        )
    )
    no_person = m.filter(pl.col("person_id").is_null()).with_columns(
        fact_id=pl.lit(None, dtype=pl.String)
    )
    keep = [c for c in m.columns] + ["fact_id"]
    out = pl.concat([ordered.select(keep), no_person.select(keep)], how="vertical_relaxed")
    if out.height != mentions.height:
        # matching must never lose (or invent) a statement of a source
        raise WarehouseError(
            f"fact matching kept {out.height} of {mentions.height} mentions",
            hint="a bug in the matching rules; the previous warehouse stays published",
        )
    return out.join(
        codes.group_by("mention_id").agg(codes=pl.col("sc").unique().sort()),
        on="mention_id",
        how="left",
    ).sort("mention_id")


def _pick_code(mentions: pl.DataFrame) -> pl.DataFrame:
    """The code shown for each fact: the most common code of the preferred system."""
    rows = (
        mentions.filter(pl.col("fact_id").is_not_null())
        .select("fact_id", "kind", "concept_codings", "is_claim")
        .explode("concept_codings")
        .explode("concept_codings")
        .unnest("concept_codings")
        .filter(pl.col("code").is_not_null())
        .with_columns(system=norm_system(pl.col("system")))
    )
    rank_map: dict[str, int] = {}
    rows = rows.with_columns(
        rank=pl.struct("kind", "system").map_batches(
            lambda s: pl.Series(
                [_rank(r["kind"], r["system"], rank_map) for r in s.to_list()], dtype=pl.Int64
            ),
            return_dtype=pl.Int64,
        )
    )
    return (
        rows.group_by("fact_id", "system", "code", "rank")
        .agg(n=pl.len(), display=pl.col("display").drop_nulls().first())
        .sort(["fact_id", "rank", "n", "code"], descending=[False, False, True, False])
        .unique(subset=["fact_id"], keep="first")
        .select("fact_id", code_system="system", code="code", display="display")
    )


def _rank(kind: str, system: str | None, cache: dict[str, int]) -> int:
    key = f"{kind}\x00{system}"
    if key not in cache:
        prefs = PREFERRED_SYSTEMS.get(kind, [])
        cache[key] = prefs.index(system) if system in prefs else len(prefs)
    return cache[key]


def build_facts(mentions: pl.DataFrame) -> pl.DataFrame:
    """One row per fact from the matched mentions."""
    matched = mentions.filter(pl.col("fact_id").is_not_null())
    facts = matched.group_by("fact_id").agg(
        kind=pl.col("kind").first(),
        person_id=pl.col("person_id").first(),
        concept=pl.col("concept").first(),
        text=pl.col("text").drop_nulls().mode().sort().first(),
        effective_date=pl.col("day").min(),
        last_date=pl.col("day").max(),
        value_num=pl.col("value_num").drop_nulls().first(),
        value_unit=pl.col("value_unit").drop_nulls().first(),
        value_text=pl.col("value_text").drop_nulls().first(),
        status=pl.col("status").filter(~pl.col("is_claim")).drop_nulls().first(),
        category=pl.col("category").filter(~pl.col("is_claim")).drop_nulls().first(),
        n_mentions=pl.len(),
        n_sources=pl.col("source").n_unique(),
        n_resources=pl.col("resource_key").n_unique(),
        sources=pl.col("source").unique().sort(),
        patterns=pl.col("pattern").unique().sort(),
        # the exchange purposes of its network sources (empty when none came by the network)
        permitted_purposes=pl.col("permitted_purpose").drop_nulls().unique().sort(),
        from_claims=pl.col("is_claim").any(),
        from_clinical=(~pl.col("is_claim")).any(),
        first_fetched_at=pl.col("fetched_at").min(),
        last_fetched_at=pl.col("fetched_at").max(),
    )
    return facts.join(_pick_code(matched), on="fact_id", how="left").sort("kind", "fact_id")

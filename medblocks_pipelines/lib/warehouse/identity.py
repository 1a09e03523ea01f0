"""Identity: link source patients to persons (splink on DuckDB, deterministic rules first).

A *source patient* is one Patient resource at one source (key ``source/Patient/id``). A *person* is a
cluster of source patients that are the same human. Edges come from three places, strongest first:

1. ``patient_ref`` — patient-access connections already know their person: the Patient of every
   connection that carries the same tenant ``patient_ref`` is the same person (score 1.0). When the
   connection records its ``source_patient_id`` only that Patient gets the reference; otherwise every
   Patient landed through the connection does.
2. ``identifier:<system>`` — the same identifier system and value (an organization's MRN, a payer's member
   id): the same registration seen twice (score 1.0).
3. ``ssn+dob`` — the same SSN and the same birth date (score 1.0). An SSN alone is not enough: placeholder
   and recycled numbers exist, and a random 9-digit space collides at scale.
4. ``probabilistic`` — a Fellegi-Sunter model (splink) over standardised given name (with nicknames),
   family name (with maiden name), birth date (with day/month swaps and off-by-one), sex, address, postal
   code, phone, e-mail and SSN. u-probabilities are estimated by seeded random sampling, m-probabilities
   are fixed priors (documented below) so a build is reproducible and fast; on tiny data the priors are
   used as they are.

Probabilistic links are *vetoed* (twins share birth date, address, phone and family name, and the
independence assumption of Fellegi-Sunter would otherwise merge them) when:

- the given names conflict: no shared nickname/formal form, and the closest forms are more than one
  edit apart with Jaro-Winkler < 0.88; or the names differ and the sexes differ, so a nickname shared
  across sexes (Alex) does not join Alexander and Alexandra. A matching SSN overrides this veto;
- both SSNs are present and differ;
- the birth dates differ by more than a day/month swap or one day, without an SSN match.

Vetoed edges are kept (``accepted = false``, ``veto``) so the decision is auditable;
``persons.conflicts`` counts vetoed pairs that still ended in one person through other links (a person
to review).

Demographics are read from the landed JSON (``resources``), not from the ``patient`` view table: linkage
needs every name (maiden names), every identifier (SSN, MRNs) and the current address, where the view
keeps one value per column for analysts.

Clusters are connected components of the accepted edges. ``person_id`` is derived from the smallest
member key of the cluster (a hash of it), so it is stable across rebuilds as long as that member stays.
"""

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from medblocks_pipelines.lib.warehouse.standardise import standardise_demographics

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
DEFAULT_THRESHOLD = 0.95  # match probability at or above which a probabilistic edge is accepted
DEFAULT_SEED = 42
GIVEN_CONFLICT_JW = 0.88

# The raw demographics of every Patient resource, straight from the landed JSON. `from_json` with a
# typed structure parses each document once, at scan speed.
_PATIENT_STRUCTURE = json.dumps(
    {
        "name": [{"use": "VARCHAR", "family": "VARCHAR", "given": ["VARCHAR"]}],
        "gender": "VARCHAR",
        "birthDate": "VARCHAR",
        "address": [
            {
                "use": "VARCHAR",
                "line": ["VARCHAR"],
                "city": "VARCHAR",
                "postalCode": "VARCHAR",
                "period": {"end": "VARCHAR"},
            }
        ],
        "telecom": [{"system": "VARCHAR", "value": "VARCHAR"}],
        "identifier": [{"system": "VARCHAR", "value": "VARCHAR"}],
    }
)

PATIENT_SQL = f"""
WITH p AS (
    SELECT resource_key, resource_id, source, pattern, organization, connection, fetched_at,
           from_json(resource, '{_PATIENT_STRUCTURE}') AS j
    FROM {{table}}
    WHERE resource_type = 'Patient'
), n AS (
    SELECT *,
        coalesce(
            list_filter(j.name, lambda x: x.use = 'official')[1],
            list_filter(j.name, lambda x: coalesce(x.use, '') NOT IN ('maiden', 'old', 'nickname'))[1],
            j.name[1]) AS nm,
        list_filter(j.name, lambda x: x.use = 'maiden')[1].family AS maiden,
        coalesce(list_filter(j.address, lambda a: a.period.end IS NULL)[1], j.address[1]) AS addr
    FROM p
)
SELECT resource_key AS patient_key, resource_id, source, pattern, organization, connection,
       fetched_at,
       nm.given[1] AS given, nm.given[2] AS middle, nm.family AS family, maiden,
       j.gender AS gender, j.birthDate AS birth_date,
       addr.line[1] AS address_line, addr.city AS city, addr.postalCode AS postal_code,
       list_filter(j.telecom, lambda t: t.system = 'phone')[1].value AS phone,
       list_filter(j.telecom, lambda t: t.system = 'email')[1].value AS email,
       list_filter(j.identifier, lambda i: i.system = '{SSN_SYSTEM}')[1].value AS ssn,
       list_transform(
           list_filter(j.identifier, lambda i: i.system IS NOT NULL AND i.value IS NOT NULL
                                             AND i.system <> '{SSN_SYSTEM}'),
           lambda i: i.system || '|' || i.value) AS identifiers
FROM n
ORDER BY patient_key
"""

RAW_COLUMNS = [
    "patient_key",
    "source",
    "pattern",
    "organization",
    "connection",
    "given",
    "middle",
    "family",
    "maiden",
    "gender",
    "birth_date",
    "address_line",
    "postal_code",
    "phone",
    "email",
    "ssn",
    "identifiers",
]


@dataclass
class IdentityOptions:
    """Tunable knobs of the linkage (defaults are the documented model)."""

    threshold: float = DEFAULT_THRESHOLD
    seed: int = DEFAULT_SEED
    train_u: bool = True
    u_max_pairs: float = 2e6
    min_records_for_training: int = 500


@dataclass
class IdentityResult:
    """The outcome of linking: every edge considered, each source patient's person, the persons."""

    edges: pl.DataFrame
    links: pl.DataFrame
    persons: pl.DataFrame
    trained: bool
    timings: dict[str, float] = field(default_factory=dict)


def extract_source_patients(
    con: duckdb.DuckDBPyConnection, table: str = "resources"
) -> pl.DataFrame:
    """The raw demographics of every Patient resource in ``table`` (one row per source patient)."""
    arrow = con.sql(PATIENT_SQL.replace("{table}", table)).to_arrow_table()
    return pl.from_arrow(arrow)  # type: ignore[return-value]


def patient_refs_from_control_plane(control_plane: Any, tenant: str) -> dict[str, str]:
    """connection id -> tenant patient reference, for patient-access connections that carry one."""
    if control_plane is None:
        return {}
    out: dict[str, str] = {}
    for c in control_plane.list_connections(tenant_id=tenant, pattern="patient_access"):
        if c.get("patient_ref"):
            out[str(c["id"])] = str(c["patient_ref"])
    return out


def connection_patient_keys(control_plane: Any, tenant: str) -> dict[str, str]:
    """connection id -> ``source/Patient/id`` of the patient who authorized it, when known.

    Only that Patient carries the connection's patient_ref: other Patient resources a portal returns
    (a family member's, a linked record) are not the connected person.
    """
    if control_plane is None:
        return {}
    out: dict[str, str] = {}
    for c in control_plane.list_connections(tenant_id=tenant, pattern="patient_access"):
        if c.get("patient_ref") and c.get("source_patient_id") and c.get("source_id"):
            out[str(c["id"])] = f"{c['source_id']}/Patient/{c['source_patient_id']}"
    return out


# --------------------------------------------------------------------------------------------
# deterministic rules


def _star_edges(groups: pl.DataFrame, key_col: str, group_col: str, rule: str) -> pl.DataFrame:
    """Edges from every member of a group to its smallest member (enough for connectivity).

    A ``rule`` ending in ``:`` gets the identifier system (the group value before ``|``) appended.
    """
    g = (
        groups.select(key_col, group_col)
        .drop_nulls()
        .unique()
        .with_columns(root=pl.col(key_col).min().over(group_col))
        .filter(pl.col(key_col) != pl.col("root"))
    )
    rule_expr = (
        pl.lit(rule) + pl.col(group_col).str.split("|").list.first()
        if rule.endswith(":")
        else pl.lit(rule)
    )
    return g.select(
        key_l=pl.col("root"),
        key_r=pl.col(key_col),
        rule=rule_expr,
        match_probability=pl.lit(1.0),
        match_weight=pl.lit(None, dtype=pl.Float64),
        evidence=pl.lit(None, dtype=pl.String),
    )


def deterministic_edges(
    std: pl.DataFrame,
    patient_refs: Mapping[str, str] | None = None,
    connection_patients: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Edges from trustworthy identifiers: patient_ref, identifier system+value, SSN+birth date.

    ``patient_refs``: connection -> tenant patient reference; ``connection_patients``: connection ->
    the patient key of the person who authorized it (when known, only that Patient gets the ref).
    """
    parts: list[pl.DataFrame] = []
    if patient_refs:
        cp = connection_patients or {}
        refs = pl.DataFrame(
            {
                "connection": list(patient_refs),
                "patient_ref": list(patient_refs.values()),
                "own_key": [cp.get(c) for c in patient_refs],
            },
            schema={"connection": pl.String, "patient_ref": pl.String, "own_key": pl.String},
        )
        with_ref = (
            std.select("patient_key", "connection")
            .join(refs, on="connection")
            .filter(pl.col("own_key").is_null() | (pl.col("own_key") == pl.col("patient_key")))
        )
        parts.append(_star_edges(with_ref, "patient_key", "patient_ref", "patient_ref"))
    ids = std.select("patient_key", "identifiers").explode("identifiers")
    parts.append(_star_edges(ids, "patient_key", "identifiers", "identifier:"))
    ssn_dob = std.select("patient_key", ssn_dob=pl.concat_str("ssn_std", "dob_str", separator="|"))
    parts.append(_star_edges(ssn_dob, "patient_key", "ssn_dob", "ssn+dob"))
    return pl.concat(parts, how="vertical_relaxed")


# --------------------------------------------------------------------------------------------
# probabilistic model (splink)


def splink_settings() -> Any:
    """The splink model: comparisons with prior m/u probabilities and the blocking rules.

    Priors: m is the chance a true match shows the level (from the noise a registration adds: ~20%
    nicknames, ~5% typos, ~2.5% birth-date slips, ~40% moved house, ~15% no phone, ~45% no e-mail);
    u the chance two different people show it. Training replaces u; m stays as documented.
    """
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl
    from splink import SettingsCreator, block_on

    def lvl(level: Any, m: float, u: float, label: str | None = None) -> Any:
        if label:
            return level.configure(m_probability=m, u_probability=u, label_for_charts=label)
        return level.configure(m_probability=m, u_probability=u)

    dob_near = (
        "(substr(dob_str_l, 1, 4) = substr(dob_str_r, 1, 4) "
        "AND substr(dob_str_l, 6, 2) = substr(dob_str_r, 9, 2) "
        "AND substr(dob_str_l, 9, 2) = substr(dob_str_r, 6, 2)) "
        "OR abs(date_diff('day', CAST(dob_str_l AS DATE), CAST(dob_str_r AS DATE))) <= 1"
    )
    comparisons: list[Any] = [
        cl.CustomComparison(
            output_column_name="given",
            comparison_levels=[
                cll.NullLevel("given_std"),
                lvl(cll.ExactMatchLevel("given_std"), 0.75, 0.01, "exact"),
                lvl(cll.ArrayIntersectLevel("given_variants", 1), 0.18, 0.002, "nickname"),
                lvl(cll.JaroWinklerLevel("given_std", 0.88), 0.05, 0.01, "jaro-winkler>=0.88"),
                lvl(cll.ElseLevel(), 0.02, 0.978, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="family",
            comparison_levels=[
                cll.NullLevel("family_std"),
                lvl(cll.ExactMatchLevel("family_std"), 0.8, 0.005, "exact"),
                lvl(cll.ArrayIntersectLevel("family_variants", 1), 0.08, 0.0005, "maiden name"),
                lvl(cll.JaroWinklerLevel("family_std", 0.9), 0.05, 0.005, "jaro-winkler>=0.9"),
                lvl(cll.ElseLevel(), 0.07, 0.99, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="dob",
            comparison_levels=[
                cll.NullLevel("dob_str"),
                lvl(cll.ExactMatchLevel("dob_str"), 0.97, 0.0001, "exact"),
                lvl(cll.CustomLevel(dob_near), 0.025, 0.0003, "day/month swap or 1 day"),
                lvl(cll.ElseLevel(), 0.005, 0.9996, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="sex",
            comparison_levels=[
                cll.NullLevel("sex"),
                lvl(cll.ExactMatchLevel("sex"), 0.99, 0.5, "same"),
                lvl(cll.ElseLevel(), 0.01, 0.5, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="address",
            comparison_levels=[
                cll.NullLevel("address_std"),
                lvl(cll.ExactMatchLevel("address_std"), 0.65, 0.0005, "same street address"),
                lvl(cll.ExactMatchLevel("postcode"), 0.05, 0.02, "same postal code"),
                lvl(cll.ElseLevel(), 0.30, 0.9795, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="phone",
            comparison_levels=[
                cll.NullLevel("phone_std"),
                lvl(cll.ExactMatchLevel("phone_std"), 0.95, 0.0005, "exact"),
                lvl(cll.ElseLevel(), 0.05, 0.9995, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="email",
            comparison_levels=[
                cll.NullLevel("email_std"),
                lvl(cll.ExactMatchLevel("email_std"), 0.97, 0.0001, "exact"),
                lvl(cll.ElseLevel(), 0.03, 0.9999, "different"),
            ],
        ),
        cl.CustomComparison(
            output_column_name="ssn",
            comparison_levels=[
                cll.NullLevel("ssn_std"),
                lvl(cll.ExactMatchLevel("ssn_std"), 0.995, 0.00001, "exact"),
                lvl(cll.ElseLevel(), 0.005, 0.99999, "different"),
            ],
        ),
    ]
    blocking: list[Any] = [
        block_on("dob_str"),
        block_on("ssn_std"),
        block_on("email_std"),
        block_on("phone_std", "substr(dob_str, 1, 4)"),
        block_on("family_std", "postcode"),
        block_on("given_std", "address_std"),
    ]
    return SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="unique_id",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=blocking,
        probability_two_random_records_match=0.0001,
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=True,
        additional_columns_to_retain=[],
    )


_SPLINK_COLUMNS = [
    "unique_id",
    "given_std",
    "given_variants",
    "middle_initial",
    "family_std",
    "family_variants",
    "sex",
    "dob_str",
    "address_std",
    "postcode",
    "phone_std",
    "email_std",
    "ssn_std",
]
_COMPARISONS = ["given", "family", "dob", "sex", "address", "phone", "email", "ssn"]


def probabilistic_edges(
    std: pl.DataFrame, options: IdentityOptions | None = None
) -> tuple[pl.DataFrame, bool]:
    """Score candidate pairs with splink; returns edges (with per-comparison evidence) and whether
    the u-probabilities were trained on this data (else the priors were used)."""
    from splink import DuckDBAPI, Linker

    opts = options or IdentityOptions()
    empty = pl.DataFrame(
        schema={
            "key_l": pl.String,
            "key_r": pl.String,
            "rule": pl.String,
            "match_probability": pl.Float64,
            "match_weight": pl.Float64,
            "evidence": pl.String,
        }
    )
    if std.height < 2:
        return empty, False
    frame = std.with_row_index("unique_id").select(_SPLINK_COLUMNS)
    keys = std.get_column("patient_key")
    arrow = frame.to_arrow()
    # splink keeps its working tables in its own in-memory database, never in the warehouse file
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    trained = False
    try:
        db_api = DuckDBAPI(con)
        sdf = db_api.register(arrow, table_name="source_patients")
        linker = Linker(sdf, splink_settings(), log_level=logging.WARNING)
        if opts.train_u and std.height >= opts.min_records_for_training:
            try:
                linker.training.estimate_u_using_random_sampling(
                    max_pairs=opts.u_max_pairs, seed=opts.seed
                )
                trained = True
            except Exception:  # noqa: BLE001 - training is an optimisation; priors still hold
                trained = False
        pred = linker.inference.predict(threshold_match_probability=0.5)
        rel = pred.as_duckdbpyrelation()
        mw_cols = ", ".join(f"mw_{c}" for c in _COMPARISONS)
        out = rel.select(
            f"unique_id_l, unique_id_r, match_probability, match_weight, {mw_cols}"
        ).to_arrow_table()
        labels = _level_labels(linker)
    finally:
        con.close()
    df = pl.from_arrow(out)
    assert isinstance(df, pl.DataFrame)
    if df.height == 0:
        return empty, trained
    # splink reports the partial match weight of each comparison; the level is the one whose
    # log2(m/u) it equals (levels of one comparison have distinct weights)
    evidence = pl.struct(
        [
            pl.struct(
                level=_label_expr(pl.col(f"mw_{c}"), labels[c]),
                weight=pl.col(f"mw_{c}").round(2),
            ).alias(c)
            for c in _COMPARISONS
        ]
    ).struct.json_encode()
    edges = df.select(
        key_l=keys.gather(pl.Series(df.get_column("unique_id_l"))),
        key_r=keys.gather(pl.Series(df.get_column("unique_id_r"))),
        rule=pl.lit("probabilistic"),
        match_probability=pl.col("match_probability").cast(pl.Float64),
        match_weight=pl.col("match_weight").cast(pl.Float64),
        evidence=evidence,
    )
    return edges, trained


def _level_labels(linker: Any) -> dict[str, list[tuple[float, str]]]:
    """(partial match weight, level label) per comparison, from the (trained) settings."""
    out: dict[str, list[tuple[float, str]]] = {}
    for comp in linker._settings_obj.comparisons:
        levels: list[tuple[float, str]] = []
        for lvl in comp.comparison_levels:
            if lvl.is_null_level:
                continue
            levels.append((float(lvl._log2_bayes_factor), str(lvl.label_for_charts)))
        out[comp.output_column_name] = levels
    return out


def _label_expr(mw: pl.Expr, levels: list[tuple[float, str]]) -> pl.Expr:
    """The label of the level whose weight is nearest to ``mw`` (0 with no exact level = null)."""
    expr: Any = pl.lit("null")
    best: Any = None
    for weight, label in levels:
        cond = (mw - weight).abs() < 1e-6
        best = (
            pl.when(cond).then(pl.lit(label))
            if best is None
            else best.when(cond).then(pl.lit(label))
        )
    return best.otherwise(expr) if best is not None else expr


def apply_vetoes(edges: pl.DataFrame, std: pl.DataFrame) -> pl.DataFrame:
    """Mark probabilistic edges that conflict on given name or SSN as not accepted (twins guard)."""
    attrs = std.select("patient_key", "given_std", "given_variants", "ssn_std", "sex", "dob")
    e = edges.join(
        attrs.rename(lambda c: c + "_l"),
        left_on="key_l",
        right_on="patient_key_l",
        how="left",
        maintain_order="left",
    ).join(
        attrs.rename(lambda c: c + "_r"),
        left_on="key_r",
        right_on="patient_key_r",
        how="left",
        maintain_order="left",
    )
    con = duckdb.connect()
    try:
        arrow = e.select("given_variants_l", "given_variants_r").to_arrow()  # noqa: F841
        # the closest pair of name forms: a nickname against a misspelt formal name (Jen /
        # Jennier) is one slip away from a shared form
        jw = pl.from_arrow(
            con.sql(
                """
                SELECT coalesce(list_max(flatten(list_transform(given_variants_l, lambda a:
                           list_transform(given_variants_r, lambda b:
                               jaro_winkler_similarity(a, b))))), 1.0) AS jw,
                       coalesce(list_min(flatten(list_transform(given_variants_l, lambda a:
                           list_transform(given_variants_r, lambda b:
                               damerau_levenshtein(a, b))))), 0) AS dl
                FROM arrow
                """
            ).to_arrow_table()
        )
    finally:
        con.close()
    assert isinstance(jw, pl.DataFrame)
    e = e.with_columns(jw=jw.get_column("jw"), dl=jw.get_column("dl"))
    shares_variant = (
        pl.col("given_variants_l").list.set_intersection(pl.col("given_variants_r")).list.len() > 0
    )
    different_given = (
        pl.col("given_std_l").is_not_null()
        & pl.col("given_std_r").is_not_null()
        & ~shares_variant.fill_null(False)
    )
    sex_differs = (pl.col("sex_l") != pl.col("sex_r")).fill_null(False)
    # a typo (one edit, or Jaro-Winkler >= 0.88) is not a conflict unless the sexes differ too
    # (Alexander / Alexandra twins)
    # a nickname shared across sexes (Alex, Sam, Chris, Pat) is no evidence when the sexes differ
    given_conflict = (different_given & (pl.col("jw") < GIVEN_CONFLICT_JW) & (pl.col("dl") > 1)) | (
        sex_differs
        & pl.col("given_std_l").is_not_null()
        & pl.col("given_std_r").is_not_null()
        & (pl.col("given_std_l") != pl.col("given_std_r"))
    )
    ssn_conflict = (
        pl.col("ssn_std_l").is_not_null()
        & pl.col("ssn_std_r").is_not_null()
        & (pl.col("ssn_std_l") != pl.col("ssn_std_r"))
    )
    # the same SSN outweighs a name slip (twins have different SSNs)
    given_conflict = given_conflict & ~(pl.col("ssn_std_l") == pl.col("ssn_std_r")).fill_null(False)
    dl, dr = pl.col("dob_l"), pl.col("dob_r")
    swapped = (
        (dl.dt.year() == dr.dt.year())
        & (dl.dt.month() == dr.dt.day())
        & (dl.dt.day() == dr.dt.month())
    )
    # a full birth-date disagreement (not a day/month swap or a one-day slip) is another person
    # unless the SSN agrees: names and e-mails (built from names) collide far more than dates
    dob_conflict = (
        dl.is_not_null()
        & dr.is_not_null()
        & ((dl - dr).dt.total_days().abs() > 1)
        & ~swapped
        & ~(pl.col("ssn_std_l") == pl.col("ssn_std_r")).fill_null(False)
    )
    prob = pl.col("rule") == "probabilistic"
    veto = (
        pl.when(prob & given_conflict)
        .then(pl.lit("given names conflict"))
        .when(prob & ssn_conflict)
        .then(pl.lit("different SSNs"))
        .when(prob & dob_conflict)
        .then(pl.lit("birth dates conflict"))
        .otherwise(None)
    )
    return e.with_columns(veto=veto).select(*edges.columns, "veto")


# --------------------------------------------------------------------------------------------
# clustering


def connected_components(keys: Iterable[str], edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """key -> smallest key of its connected component (union-find, path halving)."""
    parent: dict[str, str] = {k: k for k in keys}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        if a not in parent or b not in parent:
            continue
        ra, rb = find(a), find(b)
        if ra != rb:
            # the smaller key becomes the root, so the root is the component's minimum
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {k: find(k) for k in parent}


def person_id_for(root_key: str) -> str:
    """A stable person id derived from the cluster's smallest member key."""
    return "person-" + hashlib.sha256(root_key.encode()).hexdigest()[:16]


def link_patients(
    raw: pl.DataFrame,
    *,
    patient_refs: Mapping[str, str] | None = None,
    connection_patients: Mapping[str, str] | None = None,
    options: IdentityOptions | None = None,
) -> IdentityResult:
    """Link source patients (raw demographics as from :func:`extract_source_patients`) to persons."""
    import time

    opts = options or IdentityOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    std = standardise_demographics(raw).collect()
    timings["standardise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    det = deterministic_edges(std, patient_refs, connection_patients)
    timings["deterministic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prob, trained = probabilistic_edges(std, opts)
    timings["probabilistic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prob = prob.filter(pl.col("match_probability") >= opts.threshold)
    all_edges = pl.concat([det, prob], how="vertical_relaxed")
    # one row per pair and rule; a pair found by a rule and by the model keeps both
    all_edges = (
        all_edges.with_columns(
            key_a=pl.min_horizontal("key_l", "key_r"), key_b=pl.max_horizontal("key_l", "key_r")
        )
        .select(
            key_l=pl.col("key_a"),
            key_r=pl.col("key_b"),
            rule=pl.col("rule"),
            match_probability=pl.col("match_probability"),
            match_weight=pl.col("match_weight"),
            evidence=pl.col("evidence"),
        )
        .unique(subset=["key_l", "key_r", "rule"], keep="first")
        .sort("key_l", "key_r", "rule")
    )
    all_edges = apply_vetoes(all_edges, std).with_columns(accepted=pl.col("veto").is_null())
    keys = std.get_column("patient_key").to_list()
    accepted = all_edges.filter(pl.col("accepted"))
    roots = connected_components(
        keys,
        zip(
            accepted.get_column("key_l").to_list(),
            accepted.get_column("key_r").to_list(),
            strict=True,
        ),
    )
    root_df = pl.DataFrame(
        {"patient_key": list(roots), "root": list(roots.values())},
        schema={"patient_key": pl.String, "root": pl.String},
    ).with_columns(
        person_id=pl.lit("person-")
        + pl.col("root").map_batches(
            lambda s: pl.Series([person_id_for(x)[7:] for x in s.to_list()], dtype=pl.String),
            return_dtype=pl.String,
        )
    )
    timings["cluster"] = time.perf_counter() - t0

    links = _links_table(std, root_df, accepted)
    persons = _persons_table(std, links)
    person_of = links.select("patient_key", "person_id")
    conflicts = (
        all_edges.filter(~pl.col("accepted"))
        .join(person_of.rename({"patient_key": "key_l", "person_id": "p_l"}), on="key_l")
        .join(person_of.rename({"patient_key": "key_r", "person_id": "p_r"}), on="key_r")
        .filter(pl.col("p_l") == pl.col("p_r"))
        .group_by(person_id="p_l")
        .agg(conflicts=pl.len().cast(pl.Int64))
    )
    persons = persons.join(conflicts, on="person_id", how="left").with_columns(
        conflicts=pl.col("conflicts").fill_null(0)
    )
    return IdentityResult(
        edges=all_edges, links=links, persons=persons, trained=trained, timings=timings
    )


_RULE_RANK = {"patient_ref": 0, "ssn+dob": 2, "probabilistic": 3}


def _links_table(std: pl.DataFrame, roots: pl.DataFrame, accepted: pl.DataFrame) -> pl.DataFrame:
    """patient_links: each source patient, its person, and the strongest accepted edge touching it."""
    both = pl.concat(
        [
            accepted.select(
                patient_key="key_l",
                linked_to="key_r",
                rule="rule",
                score="match_probability",
                match_weight="match_weight",
                evidence="evidence",
            ),
            accepted.select(
                patient_key="key_r",
                linked_to="key_l",
                rule="rule",
                score="match_probability",
                match_weight="match_weight",
                evidence="evidence",
            ),
        ]
    ).with_columns(rank=pl.col("rule").replace_strict(_RULE_RANK, default=1, return_dtype=pl.Int32))
    best = both.sort(
        ["patient_key", "rank", "score", "linked_to"], descending=[False, False, True, False]
    ).unique(subset=["patient_key"], keep="first")
    n_edges = both.group_by("patient_key").agg(n_links=pl.len())
    out = (
        std.select(
            "patient_key",
            "source",
            "pattern",
            "organization",
            "connection",
        )
        .join(roots.select("patient_key", "person_id"), on="patient_key", how="left")
        .join(best.drop("rank"), on="patient_key", how="left")
        .join(n_edges, on="patient_key", how="left")
        .with_columns(
            rule=pl.col("rule").fill_null("singleton"),
            score=pl.col("score").fill_null(1.0),
            n_links=pl.col("n_links").fill_null(0).cast(pl.Int64),
        )
        .sort("patient_key")
    )
    return out


def _persons_table(std: pl.DataFrame, links: pl.DataFrame) -> pl.DataFrame:
    """persons: one row per person with the most common demographics across its source patients."""
    joined = std.join(links.select("patient_key", "person_id"), on="patient_key")

    def mode(col: str) -> pl.Expr:
        return pl.col(col).drop_nulls().mode().sort().first().alias(col)

    return (
        joined.group_by("person_id")
        .agg(
            mode("given_std").alias("given"),
            mode("family_std").alias("family"),
            mode("sex"),
            mode("dob").alias("birth_date"),
            mode("postcode").alias("postal_code"),
            n_source_patients=pl.len(),
            n_sources=pl.col("source").n_unique(),
            sources=pl.col("source").unique().sort(),
            patterns=pl.col("pattern").unique().sort(),
            patient_keys=pl.col("patient_key").sort(),
        )
        .with_columns(n_patterns=pl.col("patterns").list.len())
        .sort("person_id")
    )


# --------------------------------------------------------------------------------------------
# evaluation


def pairwise_metrics(
    predicted: Mapping[str, str], truth: Mapping[str, str]
) -> dict[str, float | int]:
    """Pairwise precision/recall of a clustering against ground truth (both: record -> cluster).

    Only records present in both mappings count. A pair is positive when both records share a cluster.
    """
    common = [k for k in predicted if k in truth]
    pred_pairs = _pairs(common, predicted)
    true_pairs = _pairs(common, truth)
    tp = len(pred_pairs & true_pairs)
    fp = len(pred_pairs - true_pairs)
    fn = len(true_pairs - pred_pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {
        "records": len(common),
        "true_pairs": len(true_pairs),
        "predicted_pairs": len(pred_pairs),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
    }


def pairwise_metrics_frame(df: pl.DataFrame) -> dict[str, float | int]:
    """:func:`pairwise_metrics` by counting, for millions of records.

    ``df`` has one row per record with columns ``pred`` and ``truth`` (cluster labels). Pairs are
    counted as sums of n*(n-1)/2 over clusters and over (pred, truth) intersections, never listed.
    """

    def pairs(cols: list[str]) -> int:
        sizes = df.group_by(cols).agg(n=pl.len()).get_column("n").cast(pl.Int64)
        return int((sizes * (sizes - 1) // 2).sum())

    predicted, true, tp = pairs(["pred"]), pairs(["truth"]), pairs(["pred", "truth"])
    fp, fn = predicted - tp, true - tp
    return {
        "records": df.height,
        "true_pairs": true,
        "predicted_pairs": predicted,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / predicted if predicted else 1.0,
        "recall": tp / true if true else 1.0,
    }


def _pairs(records: list[str], cluster_of: Mapping[str, str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(cluster_of[r], []).append(r)
    out: set[tuple[str, str]] = set()
    for members in groups.values():
        out.update(combinations(sorted(members), 2))
    return out


# --------------------------------------------------------------------------------------------
# the warehouse step


def write_identity_tables(con: duckdb.DuckDBPyConnection, result: IdentityResult) -> None:
    """Create ``persons``, ``patient_links`` and ``identity_edges`` from a result (Arrow, no copy)."""
    persons = result.persons.to_arrow()  # noqa: F841
    links = result.links.to_arrow()  # noqa: F841
    edges = result.edges.to_arrow()  # noqa: F841
    con.execute("CREATE OR REPLACE TABLE persons AS SELECT * FROM persons ORDER BY person_id")
    con.execute("CREATE OR REPLACE TABLE patient_links AS SELECT * FROM links ORDER BY patient_key")
    con.execute(
        "CREATE OR REPLACE TABLE identity_edges AS SELECT * FROM edges ORDER BY key_l, key_r, rule"
    )


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
    }


def to_arrow(df: pl.DataFrame) -> pa.Table:
    """A Polars frame as an Arrow table (zero-copy where the buffers allow)."""
    return df.to_arrow()

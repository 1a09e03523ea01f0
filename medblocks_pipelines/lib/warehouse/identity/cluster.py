"""Clustering accepted edges into persons: link_patients and the links/persons tables."""

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import polars as pl

from medblocks_pipelines.lib.warehouse.identity.model import (
    MODEL_SCHEMA,
    choose_threshold,
    probabilistic_edges,
)
from medblocks_pipelines.lib.warehouse.identity.rules import (
    apply_vetoes,
    deterministic_edges,
    household_guard_applies,
)
from medblocks_pipelines.lib.warehouse.standardise import standardise_demographics

DEFAULT_SEED = 42


@dataclass
class IdentityOptions:
    """Tunable knobs of the linkage (defaults are the documented model).

    ``threshold`` None: chosen per build for ``target_precision`` (see :mod:`.model`), never below
    ``min_threshold``; a number fixes it (e.g. from labelled pairs).
    """

    threshold: float | None = None
    target_precision: float = 0.99
    min_threshold: float = 0.9
    candidate_floor: float = 0.5
    seed: int = DEFAULT_SEED
    train: bool = True
    u_max_pairs: float = 1e6
    em_max_pairs: float = 1e6
    min_records_for_training: int = 500
    household_guard: str = "auto"  # on | off | auto (see rules.household_guard_applies)
    duckdb_memory_limit: str = "1GB"  # splink's DuckDB; beyond it, it spills to a temp directory


@dataclass
class IdentityResult:
    """The outcome of linking: every edge considered, each source patient's person, the persons."""

    edges: pl.DataFrame
    links: pl.DataFrame
    persons: pl.DataFrame
    trained: bool
    timings: dict[str, float] = field(default_factory=dict)
    threshold: float = 1.0
    model: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=MODEL_SCHEMA))


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


def constrained_components(
    keys: Iterable[str],
    edges: Iterable[tuple[str, str]],
    cannot_link: Iterable[tuple[str, str]],
) -> tuple[dict[str, str], list[int]]:
    """Like :func:`connected_components`, but an edge that would put a ``cannot_link`` pair into one
    component is skipped; returns the roots and the indices of the skipped edges.

    Edges are taken in the order given (strongest first): a twin recorded by a nickname both twins'
    names have (Billy: William and Robert) joins the twin it is most like, not both.
    """
    parent: dict[str, str] = {k: k for k in keys}
    forbidden: dict[str, set[str]] = {}
    for a, b in cannot_link:
        if a in parent and b in parent:
            forbidden.setdefault(a, set()).add(b)
            forbidden.setdefault(b, set()).add(a)

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    skipped: list[int] = []
    for i, (a, b) in enumerate(edges):
        if a not in parent or b not in parent:
            continue
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        fa, fb = forbidden.get(ra, set()), forbidden.get(rb, set())
        if any(find(x) == rb for x in fa) or any(find(x) == ra for x in fb):
            skipped.append(i)
            continue
        if rb < ra:
            ra, rb = rb, ra
        parent[rb] = ra
        if fa or fb:
            forbidden[ra] = fa | fb
    return {k: find(k) for k in parent}, skipped


def _cluster(keys: list[str], edges: pl.DataFrame) -> tuple[dict[str, str], pl.DataFrame]:
    """Roots of the accepted edges (deterministic first, then by match probability), never joining
    a vetoed pair through other links; edges skipped for that get ``veto`` set."""
    order = edges.with_row_index("_i").sort(
        pl.col("rule") == "probabilistic",
        "match_probability",
        "key_l",
        "key_r",
        descending=[False, True, False, False],
    )
    acc = order.filter(pl.col("accepted"))
    vetoed = edges.filter(~pl.col("accepted"))
    roots, skipped = constrained_components(
        keys,
        zip(acc.get_column("key_l").to_list(), acc.get_column("key_r").to_list(), strict=True),
        zip(
            vetoed.get_column("key_l").to_list(), vetoed.get_column("key_r").to_list(), strict=True
        ),
    )
    if skipped:
        ids = acc.get_column("_i").gather(skipped)
        hit = pl.int_range(pl.len()).is_in(ids.implode())
        edges = edges.with_columns(
            veto=pl.when(hit).then(pl.lit("joins a vetoed pair")).otherwise(pl.col("veto")),
            accepted=pl.col("accepted") & ~hit,
        )
    return roots, edges


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
    opts = options or IdentityOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    std = standardise_demographics(raw).collect()
    timings["standardise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    det = deterministic_edges(std, patient_refs, connection_patients)
    timings["deterministic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    outcome = probabilistic_edges(std, opts)
    prob, trained = outcome.edges, outcome.trained
    threshold = (
        opts.threshold
        if opts.threshold is not None
        else choose_threshold(
            prob.get_column("match_probability"), opts.target_precision, opts.min_threshold
        )
    )
    timings["probabilistic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prob = prob.filter(pl.col("match_probability") >= threshold)
    all_edges = _one_row_per_pair_and_rule(pl.concat([det, prob], how="vertical_relaxed"))
    guard = household_guard_applies(std, opts.household_guard)
    all_edges = apply_vetoes(all_edges, std, household_guard=guard).with_columns(
        accepted=pl.col("veto").is_null()
    )
    keys = std.get_column("patient_key").to_list()
    roots, all_edges = _cluster(keys, all_edges)
    accepted = all_edges.filter(pl.col("accepted"))
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
        edges=all_edges,
        links=links,
        persons=persons,
        trained=trained,
        timings=timings,
        threshold=threshold,
        model=_with_choices(outcome.model, threshold, opts.target_precision, trained, guard),
    )


def _one_row_per_pair_and_rule(edges: pl.DataFrame) -> pl.DataFrame:
    """Edges keyed (smaller, larger); a pair found by a rule and by the model keeps both rows."""
    return (
        edges.with_columns(
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


def _with_choices(
    model: pl.DataFrame, threshold: float, target_precision: float, trained: bool, guard: bool
) -> pl.DataFrame:
    """The fitted parameters plus the build's choices: threshold, target precision, trained."""
    extra = pl.DataFrame(
        {
            "parameter": ["threshold", "target_precision", "trained", "household_guard"],
            "value": [threshold, target_precision, float(trained), float(guard)],
        },
        schema={"parameter": pl.String, "value": pl.Float64},
    )
    return pl.concat([model, extra], how="diagonal_relaxed").select(list(MODEL_SCHEMA))


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
    # only the columns the table shows: a copy of every standardised column is a gigabyte at 1M
    cols = ["patient_key", "given_std", "family_std", "sex", "dob", "postcode", "source", "pattern"]
    joined = std.select(cols).join(links.select("patient_key", "person_id"), on="patient_key")

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

"""The Fellegi-Sunter model (splink on DuckDB), estimated on the tenant's own data.

Training, each step seeded so a rebuild of the same data gives the same model:

1. the probability that two random records match (lambda) from deterministic rules
   (``estimate_probability_two_random_records_match``, assumed recall 0.7);
2. u-probabilities by random sampling of record pairs (``estimate_u_using_random_sampling``);
3. m-probabilities by expectation maximisation (``estimate_parameters_using_expectation_maximisation``)
   over two blocking rules (same birth date; same given and family name), so every comparison is
   estimated in a session that does not block on it.

Candidate pairs come from the blocking rules below (each narrowed so pairs grow about linearly with
the records), plus given and family name swapped (exactly, or with the same birth date and crossed
initials). Splink's DuckDB is capped (``duckdb_memory_limit``) and spills to a temporary directory
beyond it.

Below ``min_records_for_training`` records, or when a step fails, the starting values of
:mod:`.comparisons` are used as they are (``trained`` is False, recorded in ``identity_model``).

The acceptance threshold is chosen for a target precision: among candidate pairs scored at or above a
floor, the lowest match probability ``t`` such that the mean match probability of the pairs at or
above ``t`` (the model's own estimate of their precision) reaches ``target_precision``; never below
``min_threshold``. An explicit ``threshold`` option (e.g. set from labelled pairs checked with
``medblocks warehouse identity evaluate``) overrides it. The chosen value is recorded.
"""

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from medblocks_pipelines.lib.warehouse.identity.comparisons import (
    COMPARISON_COLUMNS,
    MODEL_COLUMNS,
    build_comparisons,
)

PRIOR_LAMBDA = 0.0001  # probability two random records match, before it is estimated

EDGE_SCHEMA = {
    "key_l": pl.String,
    "key_r": pl.String,
    "rule": pl.String,
    "match_probability": pl.Float64,
    "match_weight": pl.Float64,
    "evidence": pl.String,
}

MODEL_SCHEMA = {
    "parameter": pl.String,
    "comparison": pl.String,
    "level": pl.String,
    "m_probability": pl.Float64,
    "u_probability": pl.Float64,
    "match_weight": pl.Float64,
    "value": pl.Float64,
}

#: Decimal places kept of model figures: beyond them floating-point sums are not reproducible.
DIGITS = 9


@dataclass
class ModelOutcome:
    """Scored candidate pairs, the fitted parameters and whether they were trained on the data."""

    edges: pl.DataFrame
    model: pl.DataFrame
    trained: bool


def active_comparisons(std: pl.DataFrame) -> list[str]:
    """The comparisons whose columns hold a value in at least two records."""
    counts = std.select(
        [
            pl.col(c).is_not_null().sum().alias(c)
            for cols in COMPARISON_COLUMNS.values()
            for c in cols
        ]
    ).row(0, named=True)
    return [n for n, cols in COMPARISON_COLUMNS.items() if all(counts[c] >= 2 for c in cols)]


# Prediction blocking rules: each pair of records that agrees on one rule's columns is scored. Every
# rule pairs a broad field with a narrowing one so the number of pairs stays near-linear in the
# number of records. A rule on one common field alone (a birth date) grows quadratically, and so does
# a rule whose narrowing field has few values in a large population: a city (a hospital's catchment
# is a handful of towns), a street name or a common full name (Census frequencies: many Maria
# Garcias); such fields are combined with the house number or a name instead.
_YEAR = "substr(dob_digits, 1, 4)"
_G1, _F1 = "substr(given_std, 1, 1)", "substr(family_std, 1, 1)"
_BLOCKING: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # (comparisons that must be active, columns / expressions)
    (("dob", "given"), ("dob_digits", _G1)),
    (("dob", "family"), ("dob_digits", _F1)),
    (("dob", "postcode"), ("dob_digits", "postcode")),
    (("dob", "address"), ("dob_digits", "street_key", "house_number")),
    (("family", "postcode", "given"), ("family_std", "postcode", _G1)),
    (("given", "postcode", "family"), ("given_std", "postcode", _F1)),
    (("address",), ("address_std",)),
    (("address", "postcode", "family"), ("street_key", "house_number", "postcode", _F1)),
    (("address", "postcode", "given"), ("street_key", "house_number", "postcode", _G1)),
    (("given", "family", "dob", "city"), ("given_std", "family_std", _YEAR, "city_std")),
    # the same name, the birth date's digits transposed (19720105 / 19720015)
    (("given", "family", "dob"), ("given_std", "family_std", "dob_sorted")),
    (("given", "family", "postcode"), ("given_phon", "family_phon", "postcode")),
    (("given", "family", "city"), ("given_std", "family_std", "city_std", "house_number")),
    (("given", "family", "address"), ("given_phon", "family_phon", "street_key", "house_number")),
    (("family", "address"), ("family_std", "street_key", "house_number")),
    (("given", "address"), ("given_std", "street_key", "house_number")),
    (("ssn",), ("ssn_std",)),
    (("email",), ("email_std",)),
    (("phone", "dob"), ("phone_std", _YEAR)),
]


# given and family name entered the wrong way round
_SWAPPED = "l.given_std = r.family_std AND l.family_std = r.given_std"
# the same birth date with given and family name the wrong way round, perhaps mistyped: the first
# two letters of one's given name begin the other's family name, or both initials cross over
_DOB_SWAPPED = [
    "l.dob_digits = r.dob_digits AND substr(l.given_std, 1, 2) = substr(r.family_std, 1, 2)",
    "l.dob_digits = r.dob_digits AND substr(l.given_std, 1, 1) = substr(r.family_std, 1, 1) "
    "AND substr(l.family_std, 1, 1) = substr(r.given_std, 1, 1)",
]


def _blocking_rules(active: list[str]) -> list[Any]:
    from splink import block_on

    rules: list[Any] = [
        block_on(*cols) for needs, cols in _BLOCKING if all(n in active for n in needs)
    ]
    if "given" in active and "family" in active:
        if "dob" in active:
            # after the rules on birth date and one initial, before those on names and places
            rules[3:3] = _DOB_SWAPPED
        rules.append(_SWAPPED)
    return rules


def splink_settings(active: list[str] | None = None) -> Any:
    """The splink settings: comparisons of ``active`` (default all) and prediction blocking rules."""
    from splink import SettingsCreator

    names = list(COMPARISON_COLUMNS) if active is None else active
    return SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="unique_id",
        comparisons=build_comparisons(names),
        blocking_rules_to_generate_predictions=_blocking_rules(names),
        probability_two_random_records_match=PRIOR_LAMBDA,
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=True,
        additional_columns_to_retain=[],
    )


def _train(linker: Any, active: list[str], options: Any) -> None:
    """Estimate lambda, u and m on the data (raises when a step cannot run)."""
    from splink import block_on

    det = [
        block_on(*cols)
        for names, cols in (
            (("given", "family", "dob"), ("given_std", "family_std", "dob_digits")),
            (("family", "dob", "postcode"), ("family_std", "dob_digits", "postcode")),
            (("given", "dob", "address"), ("given_std", "dob_digits", "address_std")),
        )
        if all(n in active for n in names)
    ]
    if det:
        linker.training.estimate_probability_two_random_records_match(det, recall=0.7)
    linker.training.estimate_u_using_random_sampling(
        max_pairs=options.u_max_pairs, seed=options.seed
    )
    sessions = [("dob_digits",), ("given_std", "family_std")]
    if "dob" not in active:
        sessions = [("given_std", "family_std"), ("postcode",)]
    for cols in sessions:
        linker.training.estimate_parameters_using_expectation_maximisation(
            block_on(*cols), max_pairs=options.em_max_pairs
        )


def probabilistic_edges(std: pl.DataFrame, options: Any) -> ModelOutcome:
    """Score candidate pairs with splink: edges (with per-comparison evidence), the fitted model."""
    from splink import DuckDBAPI, Linker

    empty = pl.DataFrame(schema=EDGE_SCHEMA)
    active = active_comparisons(std) if std.height >= 2 else []
    if not active:
        return ModelOutcome(empty, pl.DataFrame(schema=MODEL_SCHEMA), False)
    frame = (
        std.with_row_index("unique_id")
        .select(MODEL_COLUMNS)
        # blocking keys only: the house number, the birth date's digits in order
        .with_columns(
            house_number=pl.col("address_std").str.extract(r"^([0-9]+) ", 1),
            dob_sorted=pl.col("dob_digits").str.split("").list.sort().list.join(""),
        )
    )
    keys = std.get_column("patient_key")
    # splink keeps its working tables in its own in-memory database, never in the warehouse file
    spill = tempfile.TemporaryDirectory(prefix="identity-splink-")
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute("SET enable_progress_bar = false")
    # splink's blocked-pair and comparison tables can outgrow memory at millions of records: cap
    # DuckDB and let it spill to a scratch directory instead
    con.execute(f"SET memory_limit = '{options.duckdb_memory_limit}'")
    con.execute(f"SET temp_directory = '{spill.name}'")
    trained = False
    try:
        db_api = DuckDBAPI(con)
        arrow = frame.to_arrow()
        linker = Linker(
            db_api.register(arrow, table_name="source_patients"),
            splink_settings(active),
            log_level=logging.WARNING,
        )
        if options.train and std.height >= options.min_records_for_training:
            try:
                _train(linker, active, options)
                _round_parameters(linker)
                trained = True
            except Exception:  # noqa: BLE001 - training is an estimate; the starting values hold
                linker = Linker(
                    db_api.register(arrow, table_name="source_patients_untrained"),
                    splink_settings(active),
                    log_level=logging.WARNING,
                )
        pred = linker.inference.predict(threshold_match_probability=options.candidate_floor)
        mw_cols = ", ".join(f"mw_{c}" for c in active)
        out = (
            pred.as_duckdbpyrelation()
            .select(f"unique_id_l, unique_id_r, match_probability, match_weight, {mw_cols}")
            .to_arrow_table()
        )
        labels = _level_labels(linker)
        model = _model_table(linker)
    finally:
        con.close()
        spill.cleanup()
    df = pl.from_arrow(out)
    assert isinstance(df, pl.DataFrame)
    if df.height == 0:
        return ModelOutcome(empty, model, trained)
    # splink reports the partial match weight of each comparison; the level is the one whose
    # log2(m/u) it equals (levels of one comparison have distinct weights)
    evidence = pl.struct(
        [
            pl.struct(
                level=_label_expr(pl.col(f"mw_{c}"), labels[c]),
                weight=pl.col(f"mw_{c}").round(2),
            ).alias(c)
            for c in active
        ]
    ).struct.json_encode()
    edges = df.select(
        key_l=keys.gather(pl.Series(df.get_column("unique_id_l"))),
        key_r=keys.gather(pl.Series(df.get_column("unique_id_r"))),
        rule=pl.lit("probabilistic"),
        # DuckDB's parallel sums differ in the last bit from run to run: rounded, so re-running a
        # build gives the same warehouse (and the same threshold decisions).
        match_probability=pl.col("match_probability").cast(pl.Float64).round(DIGITS),
        match_weight=pl.col("match_weight").cast(pl.Float64).round(DIGITS),
        evidence=evidence,
    )
    return ModelOutcome(edges, model, trained)


#: Significant digits kept of the estimated m, u and lambda before scoring (see _round_parameters).
PARAMETER_DIGITS = 10


def _round_parameters(linker: Any) -> None:
    """Round the estimated parameters before they score pairs.

    EM and random sampling sum in parallel, so their estimates differ in the last bits between runs;
    every pair's weight inherits that, and rounding the weights afterwards still splits the few that
    sit on a rounding boundary (hundreds of edges at 200k records). Rounded parameters make scoring
    a pure function of the data: a rebuild gives the same warehouse.
    """
    settings = linker._settings_obj

    def sig(x: float) -> float:
        return float(f"{x:.{PARAMETER_DIGITS}g}")

    settings._probability_two_random_records_match = sig(
        settings._probability_two_random_records_match
    )
    for comp in settings.comparisons:
        for lvl in comp.comparison_levels:
            if lvl.is_null_level:
                continue
            for attr in ("_m_probability", "_u_probability"):
                value = getattr(lvl, attr)
                if isinstance(value, float):
                    setattr(lvl, attr, sig(value))


def choose_threshold(probabilities: pl.Series, target_precision: float, floor: float) -> float:
    """The lowest probability whose pairs at or above it have a mean probability >= the target."""
    p = probabilities.drop_nulls().sort(descending=True)
    if p.len() == 0:
        return floor
    expected_precision = p.cum_sum() / pl.Series(range(1, p.len() + 1))
    ok = p.filter(expected_precision >= target_precision)
    return max(floor, float(ok.min())) if ok.len() else 1.0  # type: ignore[arg-type]


def _model_table(linker: Any) -> pl.DataFrame:
    """One row per comparison level (m, u, weight) plus the probability two random records match."""
    settings = linker._settings_obj
    rows: list[dict[str, Any]] = [
        {
            "parameter": "probability_two_random_records_match",
            "value": float(settings._probability_two_random_records_match),
        }
    ]
    for comp in settings.comparisons:
        for lvl in comp.comparison_levels:
            if lvl.is_null_level:
                continue
            rows.append(
                {
                    "parameter": "level",
                    "comparison": comp.output_column_name,
                    "level": str(lvl.label_for_charts),
                    "m_probability": _num(lvl.m_probability),
                    "u_probability": _num(lvl.u_probability),
                    "match_weight": _num(lvl._log2_bayes_factor),
                }
            )
    return pl.DataFrame(rows, schema=MODEL_SCHEMA)


def _num(x: Any) -> float | None:
    try:
        return round(float(x), DIGITS)  # see DIGITS
    except (TypeError, ValueError):
        return None


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
    out: pl.Expr = best.otherwise(expr) if best is not None else expr
    return out

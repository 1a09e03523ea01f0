"""Deterministic edges (patient_ref, identifier, SSN+birth date) and the vetoes of model edges."""

from collections.abc import Mapping

import duckdb
import polars as pl

GIVEN_CONFLICT_JW = 0.88


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


def household_guard_applies(std: pl.DataFrame, setting: str = "auto") -> bool:
    """Whether the household guard (twins, parent and child) vetoes links: ``on``, ``off`` or
    ``auto``: on when most records carry a sex (US Core requires it of every Patient).

    Without a recorded sex a twin and a record whose given name was mistyped beyond recognition look
    the same (same family name, birth date and address); data without it (research extracts, the
    FEBRL benchmark) shows far more of the second, so the guard would cost recall there.
    """
    if setting in ("on", "off"):
        return setting == "on"
    if std.height == 0:
        return False
    share = std.get_column("sex").is_not_null().mean()
    return isinstance(share, float) and share >= 0.5


def apply_vetoes(
    edges: pl.DataFrame, std: pl.DataFrame, *, household_guard: bool = True
) -> pl.DataFrame:
    """Mark probabilistic edges that conflict on given name, birth date or SSN as not accepted."""
    attrs = std.select(
        "patient_key",
        "given_std",
        "given_variants",
        "family_std",
        "family_variants",
        "ssn_std",
        "sex",
        "dob",
        "dob_digits",
    )
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
    e = pl.concat([e, _closest_forms(e)], how="horizontal")
    return e.with_columns(veto=_veto_expr(household_guard)).select(*edges.columns, "veto")


def _closest_forms(e: pl.DataFrame) -> pl.DataFrame:
    """Per edge: closest given-name forms (Jaro-Winkler, edits), birth-date digit edits, family JW."""
    con = duckdb.connect()
    try:
        arrow = e.select(  # noqa: F841
            "given_std_l",
            "given_std_r",
            "given_variants_l",
            "given_variants_r",
            "dob_digits_l",
            "dob_digits_r",
            "family_std_l",
            "family_std_r",
        ).to_arrow()
        # the closest name forms, one side's name against the other's forms: a nickname against
        # a misspelt formal name (Jen / Jennier) is one slip away; two names that only share a
        # third (William / Robert, both Bill) are not. Equal values short-cut (most edges): the
        # same figures without the per-variant string functions.
        jw = pl.from_arrow(
            con.sql(
                """
                SELECT CASE WHEN given_std_l = given_std_r THEN 1.0 ELSE coalesce(greatest(
                           list_max(list_transform(given_variants_l,
                                    lambda a: jaro_winkler_similarity(a, given_std_r))),
                           list_max(list_transform(given_variants_r,
                                    lambda b: jaro_winkler_similarity(given_std_l, b)))),
                           1.0) END AS jw,
                       CASE WHEN given_std_l = given_std_r THEN 0 ELSE coalesce(least(
                           list_min(list_transform(given_variants_l,
                                    lambda a: damerau_levenshtein(a, given_std_r))),
                           list_min(list_transform(given_variants_r,
                                    lambda b: damerau_levenshtein(given_std_l, b)))),
                           0) END AS dl,
                       CASE WHEN dob_digits_l = dob_digits_r THEN 0
                            ELSE coalesce(damerau_levenshtein(dob_digits_l, dob_digits_r), 0)
                       END AS dob_dl,
                       CASE WHEN family_std_l = family_std_r THEN 1.0
                            ELSE coalesce(jaro_winkler_similarity(family_std_l, family_std_r), 0.0)
                       END AS fjw
                FROM arrow
                """
            ).to_arrow_table()
        )
    finally:
        con.close()
    assert isinstance(jw, pl.DataFrame)
    return jw.select("jw", "dl", "dob_dl", "fjw")


def _veto_expr(household_guard: bool) -> pl.Expr:
    """Why a probabilistic edge is refused (null when it is not); see the package docstring."""
    shares_variant = pl.col("given_variants_l").list.contains(pl.col("given_std_r")) | pl.col(
        "given_variants_r"
    ).list.contains(pl.col("given_std_l"))
    different_given = (
        pl.col("given_std_l").is_not_null()
        & pl.col("given_std_r").is_not_null()
        & ~shares_variant.fill_null(False)
    )
    sex_differs = (pl.col("sex_l") != pl.col("sex_r")).fill_null(False)
    ssn_match = (pl.col("ssn_std_l") == pl.col("ssn_std_r")).fill_null(False)
    # given and family name entered the wrong way round is one person, not a name conflict
    names_swapped = (
        (pl.col("given_std_l") == pl.col("family_std_r"))
        | (pl.col("family_std_l") == pl.col("given_std_r"))
    ).fill_null(False)
    family_agrees = (
        pl.col("family_variants_l").list.set_intersection(pl.col("family_variants_r")).list.len()
        > 0
    ).fill_null(False) | (pl.col("fjw") >= GIVEN_CONFLICT_JW)
    dl, dr = pl.col("dob_l"), pl.col("dob_r")
    swapped = (
        (dl.dt.year() == dr.dt.year())
        & (dl.dt.month() == dr.dt.day())
        & (dl.dt.day() == dr.dt.month())
    )
    # a full birth-date disagreement: not a day/month swap, a one-day slip or two mistyped digits
    dob_conflict = (
        (pl.col("dob_dl") > 2)
        & ((dl - dr).dt.total_days().abs() > 1).fill_null(True)
        & ~swapped.fill_null(False)
    )
    year_gap = (
        pl.col("dob_digits_l").str.slice(0, 4).cast(pl.Int32, strict=False)
        - pl.col("dob_digits_r").str.slice(0, 4).cast(pl.Int32, strict=False)
    ).abs()
    # given names that are no typo, nickname or swap of each other (one edit, or Jaro-Winkler
    # >= 0.88, is a typo); a nickname shared across sexes (Alex, Sam) is no evidence when the
    # sexes differ (Alexander / Alexandra twins)
    name_conflict = different_given & (pl.col("jw") < GIVEN_CONFLICT_JW) & (pl.col("dl") > 1)
    sex_name_conflict = (
        sex_differs
        & pl.col("given_std_l").is_not_null()
        & pl.col("given_std_r").is_not_null()
        & (pl.col("given_std_l") != pl.col("given_std_r"))
    )
    # a different given name is another person when a second personal trait disagrees too (the
    # birth date) or the family name agrees (twins, spouses, siblings share family and address;
    # Fellegi-Sunter's independence assumption would add those up); the same SSN outweighs it
    household = pl.lit(household_guard)
    given_conflict = (
        sex_name_conflict
        | (name_conflict & ~names_swapped & ((family_agrees & household) | dob_conflict))
    ) & ~ssn_match
    ssn_conflict = (
        pl.col("ssn_std_l").is_not_null()
        & pl.col("ssn_std_r").is_not_null()
        & (pl.col("ssn_std_l") != pl.col("ssn_std_r"))
    )
    # birth years a generation apart with the same name: parent and child (Jr./Sr.), unless the
    # SSN agrees
    dob_conflict = dob_conflict & household & (year_gap >= 15).fill_null(False) & ~ssn_match
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
    return veto

"""Standardising demographics for record linkage (Polars).

Source systems spell the same human differently: ``O'Brien`` / ``OBRIEN``, ``Bill`` / ``William``,
``123 Main Street Apt 4`` / ``123 MAIN ST``, ``(503) 555-0101`` / ``503-555-0101``. Linkage compares the
standardised forms. Everything here is a vectorised Polars expression: it runs at column speed and takes
and returns Arrow-backed frames, so DuckDB hands the rows over without a copy.

The rules (documented in docs/DATA_DICTIONARY.md, identity section):
- names: Unicode NFKD, accents dropped, upper case, only A-Z kept (spaces, hyphens, apostrophes removed);
- given-name variants: the name itself plus the names it is a nickname or formal form of, from the public
  ``nicknames`` package (carltonnorthern/nicknames, Apache-2.0: a hand-curated list of English given
  names and their nicknames), never from our own generator's table;
- phonetic codes of given and family names: Metaphone (``jellyfish``), for sound-alike spellings;
- birth date: the parsed date, and its eight digits ``YYYYMMDD`` as a string (kept when the date is
  garbled, e.g. month 13, so a mistyped date still compares by edit distance);
- address line: upper case, punctuation removed, unit designators (APT, UNIT, STE, #) dropped, USPS
  suffix and directional abbreviations (Publication 28) applied; every line of the address is kept
  (a second line is often a building or locality) and its words are the address tokens; city: upper
  case letters and spaces; postal code: a US ZIP(+4) gives its first five digits, any other code its
  letters and digits (at least four);
- phone: digits only, a leading US country code 1 dropped, the last ten digits kept;
- e-mail: trimmed, lower case; SSN: nine digits, placeholder values removed.
"""

from functools import lru_cache

import jellyfish
import polars as pl

# USPS Publication 28 street suffixes and directionals (the common ones).
STREET_ABBREVIATIONS: dict[str, str] = {
    "STREET": "ST",
    "AVENUE": "AVE",
    "AV": "AVE",
    "ROAD": "RD",
    "DRIVE": "DR",
    "LANE": "LN",
    "COURT": "CT",
    "BOULEVARD": "BLVD",
    "PLACE": "PL",
    "TERRACE": "TER",
    "CIRCLE": "CIR",
    "HIGHWAY": "HWY",
    "PARKWAY": "PKWY",
    "SQUARE": "SQ",
    "TRAIL": "TRL",
    "NORTH": "N",
    "SOUTH": "S",
    "EAST": "E",
    "WEST": "W",
    "NORTHEAST": "NE",
    "NORTHWEST": "NW",
    "SOUTHEAST": "SE",
    "SOUTHWEST": "SW",
}

# Placeholder SSNs that registration systems use for "unknown".
_PLACEHOLDER_SSNS = ["000000000", "111111111", "123456789", "999999999", "888888888"]


def name_expr(col: str | pl.Expr) -> pl.Expr:
    """A name standardised to upper-case A-Z only (accents folded, punctuation and spaces removed)."""
    expr = pl.col(col) if isinstance(col, str) else col
    out = expr.str.normalize("NFKD").str.replace_all(r"[^A-Za-z]", "").str.to_uppercase()
    return pl.when(out.str.len_chars() > 0).then(out).otherwise(None)


@lru_cache(maxsize=1)
def nickname_relations() -> dict[str, list[str]]:
    """Standardised name -> the names it is a nickname or formal form of (``nicknames`` package).

    The package lists ``name1 has_nickname name2`` pairs (both ways for many names: ``bill`` /
    ``william``); a relation here is direct, so two names that only share a third (William and
    Robert both have the nickname Bill) are not related.
    """
    from nicknames import name_triplets

    out: dict[str, set[str]] = {}
    for t in name_triplets():
        a, b = _plain(t.name1), _plain(t.name2)
        if a and b and a != b:
            out.setdefault(a, set()).add(b)
            out.setdefault(b, set()).add(a)
    return {k: sorted(v) for k, v in out.items()}


def _plain(name: str) -> str:
    return "".join(c for c in name.upper() if "A" <= c <= "Z")


def given_variants_expr(col: str) -> pl.Expr:
    """The standardised given name plus the names it is a nickname or formal form of (a list)."""
    std = name_expr(col)
    formal = std.replace_strict(nickname_relations(), default=[], return_dtype=pl.List(pl.String))
    return (
        pl.when(std.is_null())
        .then(None)
        .otherwise(pl.concat_list(std, formal).list.unique().list.sort())
    )


def _metaphone_series(s: pl.Series) -> pl.Series:
    uniq = s.drop_nulls().unique()
    codes = [jellyfish.metaphone(x) or None for x in uniq.to_list()]
    return s.replace_strict(uniq, codes, default=None, return_dtype=pl.String)


def phonetic_expr(col: str) -> pl.Expr:
    """The Metaphone code of a standardised name (computed once per distinct name)."""
    return pl.col(col).map_batches(_metaphone_series, return_dtype=pl.String)


def address_line_expr(col: str) -> pl.Expr:
    """An address line in USPS style: upper case, suffixes abbreviated, unit designators dropped."""
    s = (
        pl.col(col)
        .str.normalize("NFKD")
        .str.to_uppercase()
        .str.replace_all(r"[^A-Z0-9# ]", " ")
        # a unit designator and what follows it is not part of the street address
        .str.replace(r"\s*(#|\bAPT\b|\bAPARTMENT\b|\bUNIT\b|\bSTE\b|\bSUITE\b).*$", "")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )
    words = s.str.split(" ").list.eval(pl.element().replace(STREET_ABBREVIATIONS))
    out = words.list.join(" ")
    return pl.when(out.str.len_chars() > 0).then(out).otherwise(None)


def postcode_expr(col: str) -> pl.Expr:
    """A US ZIP(+4) as its five digits; another country's code as its letters and digits."""
    raw = pl.col(col).str.to_uppercase().str.strip_chars()
    alnum = raw.str.replace_all(r"[^A-Z0-9]", "")
    zip5 = raw.str.extract(r"^(\d{5})(?:-?\d{4})?$", 1)
    out = pl.when(zip5.is_not_null()).then(zip5).otherwise(alnum)
    return pl.when(out.str.len_chars() >= 4).then(out).otherwise(None)


def city_expr(col: str) -> pl.Expr:
    """A city or locality name: upper case letters and single spaces."""
    s = (
        pl.col(col)
        .str.normalize("NFKD")
        .str.to_uppercase()
        .str.replace_all(r"[^A-Z ]", "")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )
    return pl.when(s.str.len_chars() > 0).then(s).otherwise(None)


def phone_expr(col: str) -> pl.Expr:
    """A US phone number as ten digits (country code and punctuation removed)."""
    digits = pl.col(col).str.replace_all(r"[^0-9]", "")
    ten = (
        pl.when((digits.str.len_chars() == 11) & digits.str.starts_with("1"))
        .then(digits.str.slice(1))
        .otherwise(digits)
    )
    return pl.when(ten.str.len_chars() == 10).then(ten).otherwise(None)


def email_expr(col: str) -> pl.Expr:
    """An e-mail address trimmed and lower-cased; values without an ``@`` are dropped."""
    e = pl.col(col).str.strip_chars().str.to_lowercase()
    return pl.when(e.str.contains("@")).then(e).otherwise(None)


def ssn_expr(col: str) -> pl.Expr:
    """An SSN as nine digits; malformed and placeholder values become null."""
    digits = pl.col(col).str.replace_all(r"[^0-9]", "")
    ok = (digits.str.len_chars() == 9) & ~digits.is_in(_PLACEHOLDER_SSNS)
    return pl.when(ok).then(digits).otherwise(None)


def standardise_demographics(df: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Standardise the raw demographic columns of source patients for linkage.

    Expects columns ``given``, ``middle``, ``family``, ``maiden``, ``gender``, ``birth_date`` (ISO
    string), ``address_line``, ``postal_code``, ``phone``, ``email``, ``ssn`` (``city`` optional); adds
    the ``*_std`` columns the linkage model compares (raw columns are kept for the evidence trail).
    """
    lf = df.lazy()
    if "city" not in lf.collect_schema().names():
        lf = lf.with_columns(city=pl.lit(None, dtype=pl.String))
    digits = pl.col("birth_date").str.replace_all(r"[^0-9]", "")
    return lf.with_columns(
        given_std=name_expr("given"),
        given_variants=given_variants_expr("given"),
        middle_initial=name_expr("middle").str.slice(0, 1),
        family_std=name_expr("family"),
        maiden_std=name_expr("maiden"),
        sex=pl.col("gender").str.to_lowercase().replace({"unknown": None, "other": None}),
        dob=pl.col("birth_date").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False),
        dob_digits=pl.when(digits.str.len_chars() == 8).then(digits).otherwise(None),
        address_std=address_line_expr("address_line"),
        city_std=city_expr("city"),
        postcode=postcode_expr("postal_code"),
        phone_std=phone_expr("phone"),
        email_std=email_expr("email"),
        ssn_std=ssn_expr("ssn"),
    ).with_columns(
        # family names as a list: the current one and a recorded maiden name both count
        family_variants=pl.concat_list(pl.col("family_std"), pl.col("maiden_std"))
        .list.drop_nulls()
        .list.unique()
        .list.sort(),
        dob_str=pl.col("dob").dt.strftime("%Y-%m-%d"),
        given_phon=phonetic_expr("given_std"),
        family_phon=phonetic_expr("family_std"),
        address_tokens=pl.col("address_std").str.split(" ").list.unique().list.sort(),
        # the street's name: the first word of three letters or more (no house number), for
        # blocking records whose house number or unit differs
        street_key=pl.col("address_std").str.extract(r"\b([A-Z]{3,})\b", 1),
    )

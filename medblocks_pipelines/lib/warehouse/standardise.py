"""Standardising demographics for record linkage (Polars).

Source systems spell the same human differently: ``O'Brien`` / ``OBRIEN``, ``Bill`` / ``William``,
``123 Main Street Apt 4`` / ``123 MAIN ST``, ``(503) 555-0101`` / ``503-555-0101``. Linkage compares the
standardised forms. Everything here is a vectorised Polars expression: it runs at column speed and takes
and returns Arrow-backed frames, so DuckDB hands the rows over without a copy.

The rules (documented in docs/DATA_DICTIONARY.md, identity section):
- names: Unicode NFKD, accents dropped, upper case, only A-Z kept (spaces, hyphens, apostrophes removed);
- given-name variants: the name itself plus the formal names a common nickname stands for;
- address line: upper case, punctuation removed, unit designators (APT, UNIT, STE, #) dropped, USPS
  suffix and directional abbreviations (Publication 28) applied; postal code: first five digits;
- phone: digits only, a leading US country code 1 dropped, the last ten digits kept;
- e-mail: trimmed, lower case; SSN: nine digits, placeholder values removed.
"""

import polars as pl

# Common US given-name nicknames -> formal names (several when the nickname is shared).
NICKNAMES: dict[str, tuple[str, ...]] = {
    "ABBY": ("ABIGAIL",),
    "AL": ("ALBERT", "ALFRED", "ALAN"),
    "ALEX": ("ALEXANDER", "ALEXANDRA"),
    "ANDY": ("ANDREW",),
    "BARB": ("BARBARA",),
    "BECKY": ("REBECCA",),
    "BEN": ("BENJAMIN",),
    "BETH": ("ELIZABETH",),
    "BETTY": ("ELIZABETH",),
    "BILL": ("WILLIAM",),
    "BILLY": ("WILLIAM",),
    "BOB": ("ROBERT",),
    "BOBBY": ("ROBERT",),
    "CATHY": ("CATHERINE", "KATHERINE"),
    "CHARLIE": ("CHARLES",),
    "CHRIS": ("CHRISTOPHER", "CHRISTINA", "CHRISTINE"),
    "CHUCK": ("CHARLES",),
    "DAN": ("DANIEL",),
    "DANNY": ("DANIEL",),
    "DAVE": ("DAVID",),
    "DEB": ("DEBORAH",),
    "DEBBIE": ("DEBORAH",),
    "DICK": ("RICHARD",),
    "DOT": ("DOROTHY",),
    "DOTTIE": ("DOROTHY",),
    "DREW": ("ANDREW",),
    "ED": ("EDWARD",),
    "EDDIE": ("EDWARD",),
    "GREG": ("GREGORY",),
    "JACK": ("JOHN",),
    "JEN": ("JENNIFER",),
    "JENNY": ("JENNIFER",),
    "JESS": ("JESSICA",),
    "JIM": ("JAMES",),
    "JIMMY": ("JAMES",),
    "JOE": ("JOSEPH",),
    "JOHNNY": ("JOHN",),
    "KATE": ("KATHERINE", "CATHERINE"),
    "KATHY": ("KATHERINE", "CATHERINE"),
    "KATIE": ("KATHERINE", "CATHERINE"),
    "KEN": ("KENNETH",),
    "LIZ": ("ELIZABETH",),
    "MAGGIE": ("MARGARET",),
    "MATT": ("MATTHEW",),
    "MIKE": ("MICHAEL",),
    "NATE": ("NATHAN", "NATHANIEL"),
    "PAT": ("PATRICIA", "PATRICK"),
    "PATTY": ("PATRICIA",),
    "PEGGY": ("MARGARET",),
    "PEPE": ("JOSE",),
    "RICK": ("RICHARD",),
    "ROB": ("ROBERT",),
    "SAM": ("SAMUEL", "SAMANTHA"),
    "SANDRA": ("ALEXANDRA",),
    "SANDY": ("SANDRA", "ALEXANDRA"),
    "STEVE": ("STEVEN", "STEPHEN"),
    "SUE": ("SUSAN",),
    "TED": ("EDWARD", "THEODORE"),
    "TINA": ("CHRISTINA",),
    "TOM": ("THOMAS",),
    "TOMMY": ("THOMAS",),
    "TONY": ("ANTHONY",),
    "TORI": ("VICTORIA",),
    "TRISH": ("PATRICIA",),
    "VICKY": ("VICTORIA",),
    "WILL": ("WILLIAM",),
}

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


def given_variants_expr(col: str) -> pl.Expr:
    """The standardised given name plus the formal names it may be a nickname of (a list)."""
    std = name_expr(col)
    mapping = {k: list(v) for k, v in NICKNAMES.items()}
    formal = std.replace_strict(mapping, default=[], return_dtype=pl.List(pl.String))
    return (
        pl.when(std.is_null())
        .then(None)
        .otherwise(pl.concat_list(std, formal).list.unique().list.sort())
    )


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
    """The five-digit ZIP code (ZIP+4 and spaces removed)."""
    digits = pl.col(col).str.replace_all(r"[^0-9]", "").str.slice(0, 5)
    return pl.when(digits.str.len_chars() == 5).then(digits).otherwise(None)


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
    string), ``address_line``, ``postal_code``, ``phone``, ``email``, ``ssn``; adds the ``*_std``
    columns the linkage model compares (raw columns are kept for the evidence trail).
    """
    lf = df.lazy()
    return lf.with_columns(
        given_std=name_expr("given"),
        given_variants=given_variants_expr("given"),
        middle_initial=name_expr("middle").str.slice(0, 1),
        family_std=name_expr("family"),
        maiden_std=name_expr("maiden"),
        sex=pl.col("gender").str.to_lowercase().replace({"unknown": None, "other": None}),
        dob=pl.col("birth_date").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False),
        address_std=address_line_expr("address_line"),
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
    )

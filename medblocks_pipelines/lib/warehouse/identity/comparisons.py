"""The comparisons of the Fellegi-Sunter model: levels that degrade gracefully, and starting values.

Every comparison is null-aware (a missing value is no evidence either way), and a comparison whose
columns are empty in the tenant's data is left out of the model altogether (no sex, phone, e-mail or
SSN in a data set is no evidence, and nothing to train). Levels, strongest first:

- given / family name: exact; a shared nickname/formal form (given, ``nicknames`` package) or a
  recorded maiden name (family); Jaro-Winkler >= 0.92; given and family swapped; the same Metaphone
  code; Jaro-Winkler >= 0.8; different;
- birth date (its eight digits, so a garbled date such as month 13 still compares): exact; day and
  month swapped; one digit edit; within a year; two digit edits; different;
- address (all lines, USPS-standardised): exact; Jaro-Winkler >= 0.9; at least half the words shared;
  one word shared; different;
- city: exact; Jaro-Winkler >= 0.9; different. Postal code: exact; one edit; different;
- sex, phone, e-mail, SSN: exact; different.

The m and u values written here are generic *starting values*: EM and random sampling replace them
with estimates from the tenant's data (see :mod:`.model`); they are used as they are only when the data
is too small to train on or training fails. They are round numbers for any registration data, not the
noise rates of our own generator.
"""

from collections.abc import Callable
from typing import Any

# comparison name -> the standardised columns it reads (left out when all of them are empty)
COMPARISON_COLUMNS: dict[str, tuple[str, ...]] = {
    "given": ("given_std",),
    "family": ("family_std",),
    "dob": ("dob_digits",),
    "sex": ("sex",),
    "address": ("address_std",),
    "city": ("city_std",),
    "postcode": ("postcode",),
    "phone": ("phone_std",),
    "email": ("email_std",),
    "ssn": ("ssn_std",),
}

MODEL_COLUMNS = [
    "unique_id",
    "given_std",
    "given_variants",
    "given_phon",
    "family_std",
    "family_variants",
    "family_phon",
    "sex",
    "dob_digits",
    "address_std",
    "address_tokens",
    "street_key",
    "city_std",
    "postcode",
    "phone_std",
    "email_std",
    "ssn_std",
]

_DOB_SWAP = (
    "substr(dob_digits_l, 1, 4) = substr(dob_digits_r, 1, 4) "
    "AND substr(dob_digits_l, 5, 2) = substr(dob_digits_r, 7, 2) "
    "AND substr(dob_digits_l, 7, 2) = substr(dob_digits_r, 5, 2)"
)
_DOB_YEAR = (
    "abs(date_diff('day', try_strptime(dob_digits_l, '%Y%m%d'), "
    "try_strptime(dob_digits_r, '%Y%m%d'))) <= 366"
)
_TOKENS_HALF = (
    "2 * len(list_intersect(address_tokens_l, address_tokens_r)) >= "
    "greatest(len(address_tokens_l), len(address_tokens_r))"
)
_TOKENS_ONE = "len(list_intersect(address_tokens_l, address_tokens_r)) >= 1"


def _name(cll: Any, col: str, other: str, variants: str, phon: str, label: str) -> list[Any]:
    """Levels of a name comparison (``col`` the name, ``other`` the other name for swaps)."""
    return [
        (cll.NullLevel(col), None),
        (cll.ExactMatchLevel(col), (0.80, 0.005, "exact")),
        (
            cll.CustomLevel(
                f"array_contains({variants}_l, {col}_r) OR array_contains({variants}_r, {col}_l)"
            ),
            (0.05, 0.001, label),
        ),
        (cll.JaroWinklerLevel(col, 0.92), (0.06, 0.003, "jaro-winkler>=0.92")),
        (
            cll.CustomLevel(f"{col}_l = {other}_r AND {other}_l = {col}_r"),
            (0.01, 0.00001, "given and family swapped"),
        ),
        (cll.ExactMatchLevel(phon), (0.02, 0.003, "same metaphone")),
        (cll.JaroWinklerLevel(col, 0.8), (0.03, 0.03, "jaro-winkler>=0.8")),
        (cll.ElseLevel(), (0.03, 0.958, "different")),
    ]


def _levels(cll: Any) -> dict[str, list[Any]]:
    """comparison name -> [(level, (m, u, label) or None for the null level)]."""
    exact_else = {
        "sex": (0.98, 0.5),
        "phone": (0.8, 0.001),
        "email": (0.8, 0.0001),
        "ssn": (0.95, 0.00001),
    }
    out: dict[str, list[Any]] = {
        "given": _name(cll, "given_std", "family_std", "given_variants", "given_phon", "nickname"),
        "family": _name(
            cll, "family_std", "given_std", "family_variants", "family_phon", "maiden name"
        ),
        "dob": [
            (cll.NullLevel("dob_digits"), None),
            (cll.ExactMatchLevel("dob_digits"), (0.85, 0.0001, "exact")),
            (cll.CustomLevel(_DOB_SWAP), (0.02, 0.00001, "day/month swapped")),
            (cll.DamerauLevenshteinLevel("dob_digits", 1), (0.07, 0.002, "one digit edit")),
            (cll.CustomLevel(_DOB_YEAR), (0.02, 0.01, "within a year")),
            (cll.DamerauLevenshteinLevel("dob_digits", 2), (0.02, 0.02, "two digit edits")),
            (cll.ElseLevel(), (0.02, 0.9679, "different")),
        ],
        "address": [
            (cll.NullLevel("address_std"), None),
            (cll.ExactMatchLevel("address_std"), (0.6, 0.0005, "exact")),
            (cll.JaroWinklerLevel("address_std", 0.9), (0.1, 0.001, "jaro-winkler>=0.9")),
            (cll.CustomLevel(_TOKENS_HALF), (0.05, 0.005, "half the words shared")),
            (cll.CustomLevel(_TOKENS_ONE), (0.05, 0.1, "a word shared")),
            (cll.ElseLevel(), (0.2, 0.8935, "different")),
        ],
        "city": [
            (cll.NullLevel("city_std"), None),
            (cll.ExactMatchLevel("city_std"), (0.75, 0.005, "exact")),
            (cll.JaroWinklerLevel("city_std", 0.9), (0.05, 0.005, "jaro-winkler>=0.9")),
            (cll.ElseLevel(), (0.2, 0.99, "different")),
        ],
        "postcode": [
            (cll.NullLevel("postcode"), None),
            (cll.ExactMatchLevel("postcode"), (0.75, 0.003, "exact")),
            (cll.LevenshteinLevel("postcode", 1), (0.05, 0.02, "one edit")),
            (cll.ElseLevel(), (0.2, 0.977, "different")),
        ],
    }
    for name, (m, u) in exact_else.items():
        col = COMPARISON_COLUMNS[name][0]
        out[name] = [
            (cll.NullLevel(col), None),
            (cll.ExactMatchLevel(col), (m, u, "exact")),
            (cll.ElseLevel(), (1 - m, 1 - u, "different")),
        ]
    return out


def build_comparisons(active: list[str]) -> list[Any]:
    """The splink comparisons of the ``active`` comparison names, with starting m/u values."""
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl

    configure: Callable[[Any, tuple[float, float, str] | None], Any] = lambda lvl, p: (  # noqa: E731
        lvl
        if p is None
        else lvl.configure(m_probability=p[0], u_probability=p[1], label_for_charts=p[2])
    )
    levels = _levels(cll)
    return [
        cl.CustomComparison(
            output_column_name=name,
            comparison_levels=[configure(lvl, p) for lvl, p in levels[name]],
        )
        for name in active
    ]

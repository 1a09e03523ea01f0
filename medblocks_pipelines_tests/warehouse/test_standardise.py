"""Standardising demographics: names, nicknames, addresses, phones, e-mails and SSNs."""

import polars as pl
import pytest

from medblocks_pipelines.lib.warehouse.standardise import standardise_demographics

BASE = {
    "given": "Ann",
    "middle": None,
    "family": "Lee",
    "maiden": None,
    "gender": "female",
    "birth_date": "1970-01-02",
    "address_line": "1 Main St",
    "postal_code": "97201",
    "phone": "503-555-0101",
    "email": "a@b.org",
    "ssn": "900-00-0001",
}


def _std(**overrides: object) -> dict[str, object]:
    row = {**BASE, **overrides}
    df = pl.DataFrame([row], schema={k: pl.String for k in BASE})
    return standardise_demographics(df).collect().to_dicts()[0]


@pytest.mark.parametrize(
    ("column", "raw", "field", "expected"),
    [
        ("family", "O'Brien", "family_std", "OBRIEN"),  # punctuation dropped
        ("family", "Smith-Jones", "family_std", "SMITHJONES"),  # hyphenated names joined
        ("given", "José", "given_std", "JOSE"),  # accents folded
        ("given", "  ", "given_std", None),  # blank is missing, not a value
        ("address_line", "123 Main Street Apt 4", "address_std", "123 MAIN ST"),  # unit dropped
        ("address_line", "55 north Elm Avenue", "address_std", "55 N ELM AVE"),  # USPS abbrevs
        ("address_line", "9 Oak Rd #12", "address_std", "9 OAK RD"),  # '#' unit designator
        ("postal_code", "97201-1234", "postcode", "97201"),  # ZIP+4 -> ZIP
        ("postal_code", "972", "postcode", None),  # too short to compare
        ("postal_code", "4011", "postcode", "4011"),  # an Australian postcode
        ("birth_date", "1908-13-09", "dob_digits", "19081309"),  # garbled date still compares
        ("phone", "(503) 555-0101", "phone_std", "5035550101"),
        ("phone", "+1 503 555 0101", "phone_std", "5035550101"),  # country code dropped
        ("phone", "555-0101", "phone_std", None),  # no area code: not comparable
        ("email", " Ann.Lee@Example.ORG ", "email_std", "ann.lee@example.org"),
        ("email", "not-an-email", "email_std", None),
        ("ssn", "900-00-0001", "ssn_std", "900000001"),
        ("ssn", "000-00-0000", "ssn_std", None),  # placeholder
        ("ssn", "123456789", "ssn_std", None),  # placeholder
        ("birth_date", "1970-13-01", "dob", None),  # impossible date is missing
        ("gender", "unknown", "sex", None),
    ],
)
def test_standardised_value(column: str, raw: str, field: str, expected: object) -> None:
    assert _std(**{column: raw})[field] == expected


def test_nicknames_come_from_the_public_list() -> None:
    bill, william = _std(given="Bill")["given_variants"], _std(given="William")["given_variants"]
    assert "WILLIAM" in bill and "BILL" in william  # type: ignore[operator]
    # a direct relation only: William and Robert share the nickname Bill, not each other
    assert "ROBERT" not in william  # type: ignore[operator]


def test_maiden_name_joins_family_variants() -> None:
    out = _std(family="Lee", maiden="Park")
    assert out["family_variants"] == ["LEE", "PARK"]

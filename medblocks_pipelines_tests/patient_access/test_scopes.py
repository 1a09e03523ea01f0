"""SMART scope parsing, normalisation and request building (SPECS §1.5, §1.12)."""

import pytest

from medblocks_pipelines.lib.smart.scopes import (
    ScopeSet,
    build_scopes,
    choose_v2,
    parse_resource_scope,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("patient/Observation.read", "patient/Observation.rs"),  # v1 read == rs
        ("patient/Observation.write", "patient/Observation.cud"),  # v1 write == cud
        ("patient/*.*", "patient/*.cruds"),  # v1 star == cruds
        ("user/Patient.rs", "user/Patient.rs"),  # v2 kept
        (
            "patient/Observation.rs?category=laboratory",
            "patient/Observation.rs?category=laboratory",
        ),
    ],
)
def test_resource_scopes_normalise_to_v2(text: str, expected: str) -> None:
    parsed = parse_resource_scope(text)
    assert parsed is not None
    assert parsed.render() == expected


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.sr",  # letters out of cruds order
        "patient/Observation.rr",  # repeated letter
        "patient/Observation.x",  # unknown letter
        "patient/observation.rs",  # type must start upper-case
        "launch/patient",  # a context scope, not a resource scope
        "patient/Observation",  # no permission
    ],
)
def test_malformed_or_context_scopes_are_not_resource_scopes(text: str) -> None:
    assert parse_resource_scope(text) is None


def test_scope_set_merges_v1_and_v2_and_answers_questions() -> None:
    granted = ScopeSet.parse(
        "launch/patient openid fhirUser patient/Observation.read patient/Condition.r "
        "patient/Condition.s offline_access"
    )
    assert granted.normalised() == [
        "fhirUser",
        "launch/patient",
        "offline_access",
        "openid",
        "patient/Condition.rs",
        "patient/Observation.rs",
    ]
    assert granted.can_search("Observation")
    assert granted.can_search("Condition")  # r and s granted separately still add up
    assert not granted.can_search("Encounter")
    assert granted.has_offline_access
    assert not granted.can_search("Observation", contexts=("user",))


def test_wildcard_grants_every_type() -> None:
    assert ScopeSet.parse("patient/*.rs").can_search("Goal")
    assert not ScopeSet.parse("patient/*.r").can_search("Goal")  # read without search


def test_build_scopes_v1_v2_and_vendor_template() -> None:
    v2 = build_scopes(["Patient", "Observation"], v2=True)
    assert v2[:4] == ["launch/patient", "openid", "fhirUser", "offline_access"]
    assert v2[4:] == ["patient/Patient.rs", "patient/Observation.rs"]
    v1 = build_scopes(["Patient"], v2=False)
    assert v1[-1] == "patient/Patient.read"
    template = ["launch/patient", "patient/*.read", "offline_access"]
    assert build_scopes(["Patient"], v2=True, template=template) == template


@pytest.mark.parametrize(
    ("caps", "preference", "expected"),
    [
        (["permission-v2", "permission-v1"], None, True),  # v2 where offered
        (["permission-v1"], None, False),  # v1 only
        (["permission-v2"], "v1", False),  # per-vendor override: server rejects v2 in practice
        ([], None, False),  # nothing said: v1 is understood by both generations
        ([], "v2", True),
    ],
)
def test_choose_v2(caps: list[str], preference: str | None, expected: bool) -> None:
    assert choose_v2({"capabilities": caps}, preference) is expected

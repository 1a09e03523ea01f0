"""Purpose-of-use policy (pure): one test per rule, driven by the versioned XP catalog."""

from datetime import UTC, datetime, timedelta

import pytest

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.network.policy import (
    Evidence,
    PolicyRequest,
    PriorQuery,
    available_versions,
    evaluate,
    load_catalog,
    parse_catalog,
)

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
SETTINGS = {
    "network": {
        "purposes": ["T-TREAT", "T-TRTMNT", "T-IAS", "T-PH-ECR", "T-HCO-QM"],
        "organization": "org-a",
    }
}
LAUNCH = Evidence("ehr_launch", "conn-1", NOW - timedelta(days=2), "org-a")
OLD_ENC = Evidence("encounter", "rel:1", NOW - timedelta(days=400), "org-a")
OTHER_ORG = Evidence("encounter", "rel:2", NOW - timedelta(days=1), "org-b")
PA = Evidence("patient_access", "conn-9", NOW - timedelta(days=1), None, verified=True)
PA_UNVERIFIED = Evidence("patient_access", "conn-8", NOW - timedelta(days=1), None, verified=False)


def decide(purpose: str, *evidence: Evidence, **kw: object) -> str:
    req = PolicyRequest(
        tenant="t",
        tenant_settings=kw.pop("settings", SETTINGS),
        person="p",
        purpose=purpose,
        evidence=evidence,
        now=NOW,
        **kw,
    )  # type: ignore[arg-type]
    d = evaluate(req)
    return d.reason if not d.allowed else "allowed"


@pytest.mark.parametrize(
    "purpose,evidence,kw,expected",
    [
        ("T-TREAT", (LAUNCH,), {}, "allowed"),  # EHR launch at the tenant's org
        ("T-TREAT", (), {}, "no_treatment_relationship"),  # nothing documented
        ("T-TREAT", (OLD_ENC,), {}, "no_treatment_relationship"),  # too old (window 365 d)
        (
            "T-TREAT",
            (OTHER_ORG,),
            {},
            "no_treatment_relationship",
        ),  # another organization's encounter
        (
            "T-TREAT",
            (PA,),
            {},
            "no_treatment_relationship",
        ),  # patient access is not a treatment relationship
        (
            "T-TREAT",
            (LAUNCH,),
            {"settings": {"network": {"purposes": ["T-TREAT"]}}},
            "no_tenant_organization",
        ),
        ("T-PYMNT", (LAUNCH,), {}, "purpose_not_declared"),  # tenant did not declare it
        ("T-TRTMT", (LAUNCH,), {}, "purpose_removed"),  # the brief's misspelling is not a code
        ("T-HCO-QM", (LAUNCH,), {}, "purpose_removed"),  # removed in XP SOP v5.x
        ("T-NOPE", (LAUNCH,), {}, "purpose_unknown"),
        ("T-PH-ECR", (LAUNCH,), {}, "purpose_not_for_query"),  # push-only purpose
        ("T-TRTMNT", (LAUNCH,), {}, "allowed"),  # a launch is a present clinical event
        (
            "T-TRTMNT",
            (Evidence("encounter", "rel:3", NOW - timedelta(days=90), "org-a"),),
            {},
            "no_clinical_event",
        ),  # relationship yes, but no present/planned event
        ("T-TRTMNT", (LAUNCH,), {"trigger": "sweep"}, "sweep_refused"),
        (
            "T-TRTMNT",
            (LAUNCH,),
            {"prior_queries": (PriorQuery(NOW - timedelta(hours=1), "T-TRTMNT", ("conn-1",)),)},
            "repeat_without_new_event",
        ),
        (
            "T-TRTMNT",
            (LAUNCH, Evidence("appointment", "rel:4", NOW + timedelta(days=5), "org-a")),
            {"prior_queries": (PriorQuery(NOW - timedelta(hours=1), "T-TRTMNT", ("conn-1",)),)},
            "allowed",
        ),
        (
            "T-TRTMNT",
            (LAUNCH,),
            {
                "prior_queries": (PriorQuery(NOW - timedelta(hours=1), "T-TRTMNT", ("conn-1",)),),
                "retry_reason": "technical_error",
            },
            "allowed",
        ),  # SOP exception
        ("T-IAS", (PA,), {}, "allowed"),
        ("T-IAS", (PA_UNVERIFIED,), {}, "no_verified_patient_access"),
        ("T-IAS", (LAUNCH,), {}, "no_verified_patient_access"),
    ],
)
def test_rules(
    purpose: str, evidence: tuple[Evidence, ...], kw: dict[str, object], expected: str
) -> None:
    assert decide(purpose, *evidence, **kw) == expected


def test_allowed_decision_names_its_evidence() -> None:
    d = evaluate(
        PolicyRequest(
            tenant="t",
            tenant_settings=SETTINGS,
            person="p",
            purpose="T-TREAT",
            evidence=(LAUNCH, OTHER_ORG),
            now=NOW,
        )
    )
    assert d.allowed and d.evidence == (LAUNCH,) and d.catalog_version == "5.1"


def test_catalog_is_config() -> None:
    cat = load_catalog()
    assert "5.1" in available_versions()
    assert cat.code_system == "2.16.840.1.113883.3.7204.1.5.2.1"
    assert cat.get("T-TRTMNT").requires_date_range and cat.get("T-IAS").responding == "MUST"
    assert cat.get("T-HCO-QAI").parent == "T-HCO"
    with pytest.raises(ConfigError, match="unknown requirement"):
        parse_catalog(
            {
                "version": "x",
                "code_system": "1",
                "relationship_window_days": 1,
                "clinical_event_window_days": 1,
                "purposes": {
                    "X": {
                        "display": "x",
                        "responding": "MAY",
                        "fees": False,
                        "query": True,
                        "requires": ["vibes"],
                    }
                },
            }
        )
    with pytest.raises(ConfigError, match="unknown exchange-purpose catalog"):
        load_catalog("0.1")

"""Purpose-of-use policy: decide, before anything leaves the machine, whether a network query may run.

The TEFCA Exchange Purposes and their rules are configuration (``purposes/xp-v<version>.yaml``), not
code: the list changed in XP SOP v4.0, v4.1, v5.0 and v5.1 and will change again. This module is pure:
it takes the facts (tenant settings, relationship evidence, earlier queries) and returns a decision
with a machine-readable reason. :mod:`medblocks_pipelines.lib.network.query` gathers the facts from
the control plane and writes every decision to the audit log.

Refusal reasons (stable strings, used in the audit log and in Dagster metadata counts):
``purpose_unknown``, ``purpose_removed``, ``purpose_not_for_query``, ``purpose_not_declared``,
``no_tenant_organization``, ``no_treatment_relationship``, ``no_clinical_event``,
``repeat_without_new_event``, ``sweep_refused``, ``no_verified_patient_access``.
"""

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import yaml

from medblocks_pipelines.lib.errors import ConfigError

#: Evidence kinds that document a treatment relationship at an organization (Treatment XP SOP v2.0).
RELATIONSHIP_KINDS = frozenset({"encounter", "appointment", "ehr_launch"})
#: Evidence kinds that are a present or planned clinical event (visit, message, order, referral, ADT...).
CLINICAL_EVENT_KINDS = frozenset(
    {"encounter", "appointment", "ehr_launch", "order", "referral", "adt", "message", "transition"}
)
#: Repeat-query exceptions named by the Treatment XP SOP (more results, corrected demographics, retry).
REPEAT_EXCEPTIONS = frozenset({"more_results", "corrected_demographics", "technical_error"})

_FILE = re.compile(r"^xp-v(\d+)\.(\d+)\.yaml$")


@dataclass(frozen=True)
class PurposeRule:
    """One exchange purpose and what our policy needs before using it."""

    code: str
    display: str
    responding: str
    fees: bool
    query: bool
    requires: tuple[str, ...] = ()
    parent: str | None = None
    no_repeat_without_new_event: bool = False
    requires_date_range: bool = False
    only_with: str | None = None


@dataclass(frozen=True)
class PurposeCatalog:
    """A versioned list of exchange purposes (one YAML file)."""

    version: str
    code_system: str
    purposes: dict[str, PurposeRule]
    removed: dict[str, str]
    relationship_window_days: int
    clinical_event_window_days: int

    def get(self, code: str) -> PurposeRule | None:
        """The rule for ``code``, or ``None`` if the code is not in this version."""
        return self.purposes.get(code)


def available_versions() -> list[str]:
    """Catalog versions shipped in ``purposes/``, oldest first."""
    found = []
    for entry in resources.files("medblocks_pipelines.lib.network.purposes").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
    return [f"{a}.{b}" for a, b in sorted(found)]


@cache
def load_catalog(version: str | None = None) -> PurposeCatalog:
    """Load the purpose catalog ``version`` (default: the newest shipped)."""
    versions = available_versions()
    if not versions:
        raise ConfigError("no exchange-purpose catalog found in lib/network/purposes")
    version = version or versions[-1]
    if version not in versions:
        raise ConfigError(f"unknown exchange-purpose catalog version {version!r}; have {versions}")
    text = (
        resources.files("medblocks_pipelines.lib.network.purposes")
        .joinpath(f"xp-v{version}.yaml")
        .read_text("utf-8")
    )
    return parse_catalog(yaml.safe_load(text))


def parse_catalog(doc: dict[str, Any]) -> PurposeCatalog:
    """Validate and build a catalog from its YAML document."""
    try:
        purposes = {}
        for code, spec in doc["purposes"].items():
            unknown = set(spec.get("requires", [])) - {
                "treatment_relationship",
                "clinical_event",
                "patient_access",
            }
            if unknown:
                raise ConfigError(f"purpose {code}: unknown requirement(s) {sorted(unknown)}")
            purposes[code] = PurposeRule(
                code=code,
                display=str(spec["display"]),
                responding=str(spec["responding"]),
                fees=bool(spec["fees"]),
                query=bool(spec["query"]),
                requires=tuple(spec.get("requires", [])),
                parent=spec.get("parent"),
                no_repeat_without_new_event=bool(spec.get("no_repeat_without_new_event", False)),
                requires_date_range=bool(spec.get("requires_date_range", False)),
                only_with=spec.get("only_with"),
            )
        for rule in purposes.values():
            if rule.parent and rule.parent not in purposes:
                raise ConfigError(
                    f"purpose {rule.code}: parent {rule.parent} is not in the catalog"
                )
        return PurposeCatalog(
            version=str(doc["version"]),
            code_system=str(doc["code_system"]),
            purposes=purposes,
            removed={str(k): str(v) for k, v in (doc.get("removed") or {}).items()},
            relationship_window_days=int(doc["relationship_window_days"]),
            clinical_event_window_days=int(doc["clinical_event_window_days"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid exchange-purpose catalog: {exc!r}") from None


@dataclass(frozen=True)
class Evidence:
    """A fact that documents a relationship or an event for one person (ids of our own only)."""

    kind: str  # encounter | appointment | ehr_launch | patient_access | order | referral ...
    ref: str  # our id: a connection id, a relationship-event id
    at: datetime
    organization: str | None = None
    verified: bool = False  # patient_access: the patient authenticated to the source themselves

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the audit log."""
        return {
            "kind": self.kind,
            "ref": self.ref,
            "at": self.at.isoformat(),
            "organization": self.organization,
            "verified": self.verified,
        }


@dataclass(frozen=True)
class PriorQuery:
    """An earlier allowed query for the same person and purpose."""

    at: datetime
    purpose: str
    event_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyRequest:
    """Everything the policy looks at for one query."""

    tenant: str
    tenant_settings: dict[str, Any]
    person: str
    purpose: str
    evidence: tuple[Evidence, ...] = ()
    prior_queries: tuple[PriorQuery, ...] = ()
    trigger: str = "request"  # request | event | sweep
    retry_reason: str | None = None  # one of REPEAT_EXCEPTIONS
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class PolicyDecision:
    """The outcome: allowed or refused, why, and the evidence relied on."""

    allowed: bool
    purpose: str
    reason: str
    evidence: tuple[Evidence, ...] = ()
    catalog_version: str = ""
    rule: PurposeRule | None = None

    @property
    def decision(self) -> str:
        """``allowed`` or ``refused`` (the audit-log value)."""
        return "allowed" if self.allowed else "refused"


def tenant_network_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The ``network`` block of a tenant's settings JSON (empty if absent)."""
    block = (settings or {}).get("network") or {}
    if not isinstance(block, dict):
        raise ConfigError("tenant settings: 'network' must be an object")
    return block


def evaluate(request: PolicyRequest, catalog: PurposeCatalog | None = None) -> PolicyDecision:
    """Apply the purpose rules to ``request``; never raises for a refusal, returns it."""
    catalog = catalog or load_catalog()
    code = request.purpose

    def refuse(reason: str, rule: PurposeRule | None = None) -> PolicyDecision:
        return PolicyDecision(False, code, reason, (), catalog.version, rule)

    if code in catalog.removed:
        return refuse("purpose_removed")
    rule = catalog.get(code)
    if rule is None:
        return refuse("purpose_unknown")
    if not rule.query:
        return refuse("purpose_not_for_query", rule)
    net = tenant_network_settings(request.tenant_settings)
    if code not in (net.get("purposes") or []):
        return refuse("purpose_not_declared", rule)

    used: list[Evidence] = []
    org = net.get("organization")
    now = request.now
    if "treatment_relationship" in rule.requires:
        if not org:
            return refuse("no_tenant_organization", rule)
        oldest = now - timedelta(days=catalog.relationship_window_days)
        rel = [
            e
            for e in request.evidence
            if e.kind in RELATIONSHIP_KINDS and e.organization == org and e.at >= oldest
        ]
        if not rel:
            return refuse("no_treatment_relationship", rule)
        used.extend(rel)
    if "clinical_event" in rule.requires:
        if request.trigger == "sweep":
            return refuse("sweep_refused", rule)
        window = timedelta(days=catalog.clinical_event_window_days)
        events = [
            e
            for e in request.evidence
            if e.kind in CLINICAL_EVENT_KINDS
            and (org is None or e.organization in (None, org))
            and now - window <= e.at <= now + window
        ]
        if not events:
            return refuse("no_clinical_event", rule)
        if rule.no_repeat_without_new_event:
            earlier = [q for q in request.prior_queries if q.purpose == code]
            if earlier and request.retry_reason not in REPEAT_EXCEPTIONS:
                # A new event is one no earlier query of this purpose relied on.
                seen = {ref for q in earlier for ref in q.event_refs}
                events = [e for e in events if e.ref not in seen]
                if not events:
                    return refuse("repeat_without_new_event", rule)
        used.extend(e for e in events if e not in used)
    if "patient_access" in rule.requires:
        own = [e for e in request.evidence if e.kind == "patient_access" and e.verified]
        if not own:
            return refuse("no_verified_patient_access", rule)
        used.extend(own)
    reason = "ok" if request.retry_reason is None else f"ok:{request.retry_reason}"
    return PolicyDecision(True, code, reason, tuple(used), catalog.version, rule)

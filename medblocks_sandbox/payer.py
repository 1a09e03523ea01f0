"""The sandbox payer: the CMS Patient Access API shape behind its own SMART authorization server.

SPECS §1.10: Patient, Coverage and ExplanationOfBenefit (CARIN Blue Button profiles named in
`meta.profile`), plus the Organization and Practitioner they reference; the CARIN BB EOB searches
(`_id`, `_lastUpdated`, `identifier`, `patient`, `type`, `service-date`, `service-start-date`,
`billable-period-start`) and includes (`Coverage:payor`, `ExplanationOfBenefit:patient|provider|
care-team|coverage|insurer`). The app is the EHR app (`ehr.create_ehr_app`) with the payer's types
and CapabilityStatement; the authorization server is the same class with the payer's org.
"""

from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from medblocks_sandbox.auth_model import AuthConfig
from medblocks_sandbox.ehr import create_ehr_app
from medblocks_sandbox.ehr_common import ChangeSet, OrgConfig
from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.fhir_store import FhirStore

PAYER_TYPES: tuple[str, ...] = (
    "Patient",
    "Coverage",
    "ExplanationOfBenefit",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
)
C4BB = "http://hl7.org/fhir/us/carin-bb/StructureDefinition/"
CARIN_BB_SERVER = "http://hl7.org/fhir/us/carin-bb/CapabilityStatement/c4bb"

# EOB type code (http://terminology.hl7.org/CodeSystem/claim-type) -> C4BB profile.
_EOB_PROFILES = {
    "pharmacy": "C4BB-ExplanationOfBenefit-Pharmacy",
    "oral": "C4BB-ExplanationOfBenefit-Oral",
    "professional": "C4BB-ExplanationOfBenefit-Professional-NonClinician",
    "vision": "C4BB-ExplanationOfBenefit-Professional-NonClinician",
}
_SIMPLE_PROFILES = {
    "Patient": "C4BB-Patient",
    "Coverage": "C4BB-Coverage",
    "Organization": "C4BB-Organization",
    "Practitioner": "C4BB-Practitioner",
}


def carin_profile(resource: Resource) -> str | None:
    """The CARIN BB profile URL a payer resource conforms to (None for types without one)."""
    rtype = resource.get("resourceType")
    if rtype in _SIMPLE_PROFILES:
        return C4BB + _SIMPLE_PROFILES[rtype]
    if rtype != "ExplanationOfBenefit":
        return None
    codes = {c.get("code") for c in (resource.get("type") or {}).get("coding") or []}
    for code, profile in _EOB_PROFILES.items():
        if code in codes:
            return C4BB + profile
    if "institutional" in codes:
        # Inpatient vs outpatient is told by the C4BB subtype or by a stay longer than a day.
        sub = {c.get("code") for c in (resource.get("subType") or {}).get("coding") or []}
        kind = "Inpatient" if "inpatient" in sub or _is_stay(resource) else "Outpatient"
        return C4BB + f"C4BB-ExplanationOfBenefit-{kind}-Institutional"
    return C4BB + "C4BB-ExplanationOfBenefit-Professional-NonClinician"


def _is_stay(resource: Resource) -> bool:
    period = resource.get("billablePeriod") or {}
    start, end = str(period.get("start", ""))[:10], str(period.get("end", ""))[:10]
    return bool(start and end and end > start)


def with_carin_profiles(resources: Sequence[Resource]) -> list[Resource]:
    """Copies of payer resources whose `meta.profile` names their CARIN BB profile."""
    out = []
    for resource in resources:
        profile = carin_profile(resource)
        if profile is None or profile in ((resource.get("meta") or {}).get("profile") or []):
            out.append(resource)
            continue
        meta = dict(resource.get("meta") or {})
        meta["profile"] = [*(meta.get("profile") or []), profile]
        out.append({**resource, "meta": meta})
    return out


def load_payer_store(resources: Sequence[Resource], *, copy: bool = True) -> FhirStore:
    """A FhirStore of a payer's resources, CARIN BB profiles stamped where missing.

    `copy=False` for inputs nobody mutates afterwards (the copy-on-write generator).
    """
    store = FhirStore()
    store.put_many(
        with_carin_profiles([r for r in resources if r.get("resourceType") in PAYER_TYPES]),
        copy=copy,
    )
    return store


def create_payer_app(
    org: OrgConfig,
    store: FhirStore,
    *,
    base_url: str,
    admin_secret: str,
    auth_config: AuthConfig | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    middleware: Sequence[Middleware] = (),
    profile: Any = None,
    evolver: Callable[[int], ChangeSet] | None = None,
    root_routes: Sequence[BaseRoute] = (),
    faults: Any = None,
) -> Starlette:
    """The payer's Patient Access API app (FHIR base `{base_url}/fhir`), see `create_ehr_app`."""
    # Stamp CARIN BB profiles on anything loaded without them (generator output, admin upserts).
    missing = [
        r
        for r in (x for t in PAYER_TYPES for x in store.iter_type(t))
        if carin_profile(r) and carin_profile(r) not in (r.get("meta") or {}).get("profile", [])
    ]
    for resource in with_carin_profiles(missing):
        store.put(resource, keep_last_updated=True)

    def evolve_with_profiles(step: int) -> ChangeSet:
        assert evolver is not None
        upserts, deletes = evolver(step)
        return with_carin_profiles(upserts), deletes

    return create_ehr_app(
        org,
        store,
        base_url=base_url,
        admin_secret=admin_secret,
        auth_config=auth_config,
        extra_routes=extra_routes,
        middleware=middleware,
        profile=profile,
        resource_types=PAYER_TYPES,
        instantiates=(CARIN_BB_SERVER,),
        evolver=evolve_with_profiles if evolver else None,
        root_routes=root_routes,
        faults=faults,
    )

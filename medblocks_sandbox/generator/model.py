"""The generator's public data types: the population spec, organizations, ground truth and change
sets."""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

# Every relative date hangs off this fixed instant, never the wall clock: same seed, same bytes.
REFERENCE_DATE = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)

OrgKind = Literal["ehr", "payer", "network"]


@dataclass(frozen=True)
class OrgInfo:
    """One organization of the synthetic world and the identifiers others need to address it.

    `kind` says how its data is reached: "ehr" (FHIR REST + SMART + Bulk), "payer" (CMS Patient
    Access API) or "network" (only through the exchange gateway; its FHIR resources are rendered as
    C-CDA by others).
    """

    id: str
    name: str
    kind: OrgKind
    npi: str
    oid: str  # the organization's assigning-authority OID (root of its MRNs and document ids)
    mrn_system: str  # Identifier.system of its patient MRNs (member ids at the payer)
    home_community_id: str | None  # "urn:oid:..." for network orgs, None otherwise
    city: str
    id_style: str  # "epic" | "numeric" | "uuid": how its resource ids look


@dataclass(frozen=True)
class Address:
    """A postal address."""

    line: str
    city: str
    state: str
    postal_code: str


@dataclass(frozen=True)
class PersonTruth:
    """The true demographics of one human; source records are noisy copies of it."""

    person_id: str
    given: str
    middle: str
    family: str
    maiden_name: str | None
    gender: str  # administrative gender: male | female
    birth_date: str  # YYYY-MM-DD
    address: Address
    previous_address: Address | None
    phone: str
    email: str | None
    ssn: str
    race: str  # CDC race code
    ethnicity: str  # CDC ethnicity code
    twin_of: str | None = None  # person_id of a twin: a different person who must NOT be linked
    marital_status: str = "S"  # HL7 v3 MaritalStatus code
    language: str = "en-US"  # preferred language (BCP 47)


@dataclass(frozen=True)
class PortalLogin:
    """Portal credentials a test or browser types into the sandbox's SMART login page."""

    org_id: str
    username: str
    password: str
    patient_id: str


@dataclass(frozen=True)
class PopulationSpec:
    """What to generate.

    seed: the only source of randomness. persons: how many humans. years: how much history.
    twin_rate: share of persons generated as twin pairs.
    """

    seed: int = 42
    persons: int = 100
    years: int = 3
    twin_rate: float = 0.04
    reference_date: datetime = REFERENCE_DATE


@dataclass
class Changes:
    """One evolve() step: resources created and updated (with their org) and deletions."""

    created: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    updated: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    deleted: list[tuple[str, str, str]] = field(default_factory=list)  # (org_id, type, id)
    step: int = 0
    last_updated: str = ""  # the instant stamped on every created/updated resource of this step

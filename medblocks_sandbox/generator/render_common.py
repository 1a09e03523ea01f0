"""What every rendered resource shares: local times and instants, per-org ids, the clinician
roster, the org store with its fact ledger, the care context, and small FHIR datatypes.
"""

import base64
import hashlib
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.generator import codes, demographics
from medblocks_sandbox.generator.history import History
from medblocks_sandbox.generator.model import Address, OrgInfo
from medblocks_sandbox.generator.people import npi_check_digit

Resource = dict[str, Any]
LOCAL_OFFSET = timedelta(hours=-7)


def local(dt: datetime) -> str:
    """A FHIR dateTime in the organizations' local zone (UTC-07:00)."""
    return (dt + LOCAL_OFFSET).strftime("%Y-%m-%dT%H:%M:%S-07:00")


def instant(dt: datetime) -> str:
    """A FHIR instant in UTC."""
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def day(dt: datetime) -> str:
    """A FHIR date (local calendar day)."""
    return (dt + LOCAL_OFFSET).strftime("%Y-%m-%d")


def make_id(org: OrgInfo, *parts: str) -> str:
    """A stable resource id in the org's style; depends only on the org and the fact key."""
    h = hashlib.blake2b("|".join((org.id, *parts)).encode(), digest_size=16).digest()
    if org.id_style == "epic":
        return "e" + base64.b32encode(h).decode().rstrip("=")
    if org.id_style == "numeric":
        return str(int.from_bytes(h[:6], "big"))
    return str(uuid.UUID(bytes=h, version=4))


@dataclass(frozen=True)
class Clinician:
    """A practitioner of one organization's roster."""

    given: str
    family: str
    npi: str
    qualification: tuple[str, str]
    key: str


def roster(org: OrgInfo, size: int = 6) -> list[Clinician]:
    """The org's clinicians; deterministic for the org id."""
    rng = random.Random(f"roster:{org.id}")
    out = []
    for i in range(size):
        nine = "1" + "".join(str(rng.randrange(10)) for _ in range(8))
        out.append(
            Clinician(
                given=rng.choice(demographics.PRACTITIONER_GIVEN),
                family=rng.choice(demographics.PRACTITIONER_FAMILY),
                npi=nine + npi_check_digit(nine),
                qualification=rng.choice(demographics.PRACTITIONER_QUALIFICATIONS),
                key=f"clin{i}",
            )
        )
    return out


@dataclass
class OrgStore:
    """All resources held at one organization, in insertion order, plus its fact ledger rows."""

    org: OrgInfo
    resources: dict[tuple[str, str], Resource] = field(default_factory=dict)
    facts: list[tuple[str, str, str, str]] = field(default_factory=list)
    # no resource may claim to be updated after the world's reference instant
    ceiling: str | None = None

    def rid(self, *parts: str) -> str:
        """Stable id for a resource of this org."""
        return make_id(self.org, *parts)

    def put(self, resource: Resource, *, fact: str | None = None) -> Resource:
        """Store a resource (replacing one with the same type and id) and record its fact."""
        m = resource.get("meta")
        if self.ceiling is not None and m is not None and m["lastUpdated"] > self.ceiling:
            m["lastUpdated"] = self.ceiling
        self.resources[(resource["resourceType"], resource["id"])] = resource
        if fact is not None:
            self.facts.append((fact, self.org.id, resource["resourceType"], resource["id"]))
        return resource


def meta(last_updated: datetime, *profiles: str, version: int = 1) -> dict[str, Any]:
    """Resource.meta with versionId, lastUpdated and profiles."""
    m: dict[str, Any] = {"versionId": str(version), "lastUpdated": instant(last_updated)}
    if profiles:
        m["profile"] = list(profiles)
    return m


def ref(rtype: str, rid: str, display: str | None = None) -> dict[str, str]:
    """A literal reference."""
    r = {"reference": f"{rtype}/{rid}"}
    if display:
        r["display"] = display
    return r


def address(a: Address, *, period_end: str | None = None) -> dict[str, Any]:
    """FHIR Address."""
    out: dict[str, Any] = {
        "use": "home" if period_end is None else "old",
        "type": "physical",
        "line": [a.line],
        "city": a.city,
        "state": a.state,
        "postalCode": a.postal_code,
        "country": "US",
    }
    if period_end:
        out["period"] = {"end": period_end}
    return out


def quantity(value: float, unit: str) -> dict[str, Any]:
    """A UCUM Quantity."""
    return {"value": value, "unit": unit, "system": codes.UCUM, "code": unit}


@dataclass
class CareContext:
    """What a renderer needs about the patient at one org."""

    h: History
    pid: str
    clinicians: list[Clinician]
    encounter_ids: dict[int, str] = field(default_factory=dict)
    condition_ids: dict[str, str] = field(default_factory=dict)

    @property
    def person_id(self) -> str:
        """The person behind this source patient."""
        return self.h.person.person_id

    def fact(self, *parts: str) -> str:
        """A fact id: person id + fact path."""
        return "/".join((self.person_id, *parts))

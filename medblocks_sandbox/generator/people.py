"""Persons, organizations and the demographic noise each organization's registration adds.

A `PersonTruth` is the real human. Each organization that knows the person holds its own noisy
copy (`SourceDemographics`): a nickname instead of the given name, a typo, the maiden name, the
address before the move, a missing phone or e-mail, an SSN-like identifier only sometimes. Twins
share birth date, address, phone and family name but are different persons."""

import random
from dataclasses import dataclass, replace
from datetime import date, timedelta

from medblocks_sandbox.generator import demographics
from medblocks_sandbox.generator.model import Address, OrgInfo, PersonTruth

# a private OID arc for the sandbox's assigning authorities (never a real organization's)
OID_ROOT = "2.16.840.1.113883.3.72001"


def npi_check_digit(nine: str) -> str:
    """The Luhn check digit of an NPI, computed over the prefix 80840 + the first nine digits."""
    digits = [int(c) for c in "80840" + nine]
    total = 0
    # Luhn: double every second digit from the right of the payload (the check digit is appended)
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def make_npi(rng: random.Random) -> str:
    """A 10-digit NPI with a valid check digit (first digit 1 = individual, 2 = organization)."""
    nine = str(rng.choice((1, 2))) + "".join(str(rng.randrange(10)) for _ in range(8))
    return nine + npi_check_digit(nine)


def default_organizations() -> list[OrgInfo]:
    """The five organizations of the default world (two EHRs, one payer, two network-only orgs)."""
    rng = random.Random("medblocks-sandbox-orgs")
    specs = (
        ("mercy-general", "Mercy General Hospital", "ehr", "Portland", "epic", 1),
        ("lakeside-clinic", "Lakeside Family Clinic", "ehr", "Salem", "numeric", 2),
        ("summit-health-plan", "Summit Health Plan", "payer", "Portland", "uuid", 3),
        ("riverside-health", "Riverside Health System", "network", "Eugene", "uuid", 4),
        ("valley-medical", "Valley Medical Group", "network", "Bend", "uuid", 5),
    )
    orgs = []
    for org_id, name, kind, city, style, n in specs:
        nine = "1" + "".join(str(rng.randrange(10)) for _ in range(8))
        npi = nine + npi_check_digit(nine)
        oid = f"{OID_ROOT}.{n}"
        mrn_system = (
            f"https://{org_id}.example/fhir/sid/member-id"
            if kind == "payer"
            else f"urn:oid:{oid}.1"
        )
        orgs.append(
            OrgInfo(
                id=org_id,
                name=name,
                kind=kind,  # type: ignore[arg-type]
                npi=npi,
                oid=oid,
                mrn_system=mrn_system,
                home_community_id=f"urn:oid:{oid}" if kind == "network" else None,
                city=city,
                id_style=style,
            )
        )
    return orgs


def _weighted(rng: random.Random, items: tuple[tuple[str, str, float], ...]) -> tuple[str, str]:
    r = rng.random()
    acc = 0.0
    for code, display, w in items:
        acc += w
        if r < acc:
            return code, display
    return items[-1][0], items[-1][1]


def make_address(rng: random.Random) -> Address:
    """A plausible Oregon street address."""
    street = rng.choice(demographics.STREET_NAMES)
    suffix = rng.choice(demographics.STREET_SUFFIXES)[0]
    city, zip3 = rng.choice(demographics.CITIES)
    line = f"{rng.randrange(10, 9999)} {street} {suffix}"
    if rng.random() < 0.15:
        line += f" Apt {rng.randrange(1, 40)}"
    return Address(
        line=line,
        city=city,
        state=demographics.STATE,
        postal_code=f"{zip3}{rng.randrange(100):02d}",
    )


def make_phone(rng: random.Random) -> str:
    """A number on the fictional 555 exchange."""
    return f"{rng.choice(demographics.AREA_CODES)}-555-{rng.randrange(10000):04d}"


def make_ssn(rng: random.Random) -> str:
    """An SSN-shaped number in the never-issued 9xx area."""
    return f"9{rng.randrange(100):02d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def make_person(rng: random.Random, person_id: str, today: date) -> PersonTruth:
    """One human with true demographics."""
    gender = "female" if rng.random() < 0.52 else "male"
    names = demographics.FEMALE_NAMES if gender == "female" else demographics.MALE_NAMES
    given = rng.choice(list(names))
    middle = rng.choice([n for n in names if n != given])
    family = rng.choice(demographics.FAMILY_NAMES)
    # ages skew adult: the conditions we model are adult ones
    age = int(min(95, max(1, rng.gauss(50, 20))))
    birth = today - timedelta(days=age * 365 + rng.randrange(365))
    maiden = None
    if gender == "female" and age >= 25 and rng.random() < 0.4:
        maiden = rng.choice([f for f in demographics.FAMILY_NAMES if f != family])
    address = make_address(rng)
    previous = make_address(rng) if rng.random() < 0.35 else None
    email = None
    if rng.random() < 0.8:
        email = f"{given.lower()}.{family.lower().replace(' ', '').replace(chr(39), '')}"
        email += f"{rng.randrange(100)}@{rng.choice(demographics.EMAIL_DOMAINS)}"
    race = _weighted(rng, demographics.RACES)[0]
    ethnicity = _weighted(rng, demographics.ETHNICITIES)[0]
    if maiden:
        marital = "M"
    elif age < 22:
        marital = "S"
    else:
        marital = rng.choice(("S", "M", "M", "D", "W" if age > 60 else "M"))
    language = "es" if ethnicity == "2135-2" and rng.random() < 0.35 else "en-US"
    return PersonTruth(
        person_id=person_id,
        given=given,
        middle=middle,
        family=family,
        maiden_name=maiden,
        gender=gender,
        birth_date=birth.isoformat(),
        address=address,
        previous_address=previous,
        phone=make_phone(rng),
        email=email,
        ssn=make_ssn(rng),
        race=race,
        ethnicity=ethnicity,
        marital_status=marital,
        language=language,
    )


def make_twin(rng: random.Random, sibling: PersonTruth, person_id: str) -> PersonTruth:
    """A twin of `sibling`: same birth date, address, phone and family name; different person."""
    gender = "female" if rng.random() < 0.5 else "male"
    names = demographics.FEMALE_NAMES if gender == "female" else demographics.MALE_NAMES
    given = rng.choice([n for n in names if n != sibling.given])
    middle = rng.choice([n for n in names if n not in (given, sibling.given)])
    maiden = sibling.maiden_name if gender == "female" and sibling.gender == "female" else None
    family = sibling.family
    if sibling.maiden_name and gender == "male":
        # the sister married; the brother kept the birth name
        family = sibling.maiden_name
    return replace(
        sibling,
        person_id=person_id,
        given=given,
        middle=middle,
        gender=gender,
        family=family,
        maiden_name=maiden,
        email=None if rng.random() < 0.3 else f"{given.lower()}{rng.randrange(1000)}@example.com",
        ssn=make_ssn(rng),
        twin_of=sibling.person_id,
    )


@dataclass(frozen=True)
class SourceDemographics:
    """A person as registered at one organization (noise applied), plus what noise was applied."""

    given: str
    middle: str | None
    family: str
    maiden_recorded: str | None  # a separate name entry with use "maiden"
    birth_date: str
    address: Address
    phone: str | None
    email: str | None
    ssn: str | None
    noise: tuple[str, ...]


def typo(rng: random.Random, word: str) -> str:
    """A single keyboard slip: transposition, deletion, doubling or substitution (never a no-op)."""
    if len(word) < 3:
        return word + word[-1]
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    repl = "aeiou" if word[i].lower() in "aeiou" else "bcdfghklmnprst"
    choices = [c for c in repl if c != word[i].lower()]
    return word[:i] + rng.choice(choices) + word[i + 1 :]


def noisy_copy(
    rng: random.Random, person: PersonTruth, org: OrgInfo, *, first_seen_before_marriage: bool
) -> SourceDemographics:
    """The person as this organization registered them."""
    noise: list[str] = []
    names = demographics.FEMALE_NAMES if person.gender == "female" else demographics.MALE_NAMES
    given = person.given
    nicknames = names.get(given, ())
    if nicknames and rng.random() < 0.18:
        given = rng.choice(nicknames)
        noise.append("nickname")
    elif rng.random() < 0.05:
        given = typo(rng, given)
        noise.append("given_typo")
    family = person.family
    maiden_recorded = None
    if person.maiden_name:
        if first_seen_before_marriage:
            family = person.maiden_name
            noise.append("maiden_name")
        elif rng.random() < 0.4:
            maiden_recorded = person.maiden_name
    if rng.random() < 0.05:
        family = typo(rng, family)
        noise.append("family_typo")
    r = rng.random()
    middle: str | None = person.middle if r < 0.55 else (person.middle[0] if r < 0.8 else None)
    birth_date = person.birth_date
    if rng.random() < 0.025:
        y, m, d = birth_date.split("-")
        if int(d) <= 12 and d != m:
            birth_date = f"{y}-{d}-{m}"
        else:
            birth_date = (date.fromisoformat(birth_date) + timedelta(days=1)).isoformat()
        noise.append("birth_date_error")
    address = person.address
    if person.previous_address and rng.random() < 0.45:
        address = person.previous_address
        noise.append("old_address")
    phone: str | None = person.phone
    if rng.random() < 0.15:
        phone = None
        noise.append("no_phone")
    email = person.email if rng.random() < 0.55 else None
    ssn_p = 0.6 if org.kind == "payer" else 0.35
    ssn = person.ssn if rng.random() < ssn_p else None
    if ssn is None:
        noise.append("no_ssn")
    return SourceDemographics(
        given=given,
        middle=middle,
        family=family,
        maiden_recorded=maiden_recorded,
        birth_date=birth_date,
        address=address,
        phone=phone,
        email=email,
        ssn=ssn,
        noise=tuple(noise),
    )

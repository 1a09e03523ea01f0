"""Organization-level resources (Organization, Location, Practitioner) and the Patient as each
organization records it (its own MRN system, id style and demographics).
"""

from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.generator import codes, demographics
from medblocks_sandbox.generator.codes import coding
from medblocks_sandbox.generator.history import History
from medblocks_sandbox.generator.people import SourceDemographics
from medblocks_sandbox.generator.render_common import (
    Clinician,
    OrgStore,
    Resource,
    address,
    day,
    meta,
    ref,
)

# --------------------------------------------------------------------------------------------
# organization-level resources


def render_org_base(st: OrgStore, clinicians: list[Clinician], when: datetime) -> None:
    """The org's own Organization, its Locations and its Practitioners."""
    org = st.org
    kind_code = ("pay", "Payer") if org.kind == "payer" else ("prov", "Healthcare Provider")
    st.put(
        {
            "resourceType": "Organization",
            "id": st.rid("Organization", "self"),
            "meta": meta(
                when,
                codes.C4BB + "C4BB-Organization"
                if org.kind == "payer"
                else codes.US_CORE + "us-core-organization",
            ),
            "identifier": [
                {"system": codes.NPI_SYSTEM, "value": org.npi},
                {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{org.oid}"},
            ],
            "active": True,
            "type": [{"coding": [coding(codes.ORG_TYPE, *kind_code)]}],
            "name": org.name,
            "telecom": [
                {"system": "phone", "value": f"503-555-01{len(org.id) % 90 + 10}", "use": "work"}
            ],
            "address": [
                {
                    "line": [f"{100 + len(org.name) * 7} Main Street"],
                    "city": org.city,
                    "state": demographics.STATE,
                    "postalCode": "97201",
                    "country": "US",
                }
            ],
        }
    )
    if org.kind != "payer":
        for i, (name, loc_type) in enumerate(
            (
                ("Emergency Department", ("ER", "Emergency room")),
                ("Outpatient Clinic", ("OF", "Outpatient facility")),
            )
        ):
            st.put(
                {
                    "resourceType": "Location",
                    "id": st.rid("Location", str(i)),
                    "meta": meta(when, codes.US_CORE + "us-core-location"),
                    "status": "active",
                    "name": f"{org.name} {name}",
                    "type": [
                        {
                            "coding": [
                                coding(
                                    "http://terminology.hl7.org/CodeSystem/v3-RoleCode", *loc_type
                                )
                            ]
                        }
                    ],
                    "address": {
                        "line": [f"{200 + i} Main Street"],
                        "city": org.city,
                        "state": demographics.STATE,
                        "postalCode": "97201",
                        "country": "US",
                    },
                    "managingOrganization": ref("Organization", st.rid("Organization", "self")),
                }
            )
        for c in clinicians:
            st.put(practitioner(st, c, when))


def practitioner(st: OrgStore, c: Clinician, when: datetime) -> Resource:
    """A US Core / C4BB Practitioner."""
    profile = (
        codes.C4BB + "C4BB-Practitioner"
        if st.org.kind == "payer"
        else codes.US_CORE + "us-core-practitioner"
    )
    return {
        "resourceType": "Practitioner",
        "id": st.rid("Practitioner", c.npi),
        "meta": meta(when, profile),
        "identifier": [{"system": codes.NPI_SYSTEM, "value": c.npi}],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": c.family,
                "given": [c.given],
                "suffix": [c.qualification[0]],
            }
        ],
        "qualification": [
            {
                "code": {
                    "coding": [
                        coding("http://terminology.hl7.org/CodeSystem/v2-0360", *c.qualification)
                    ],
                    "text": c.qualification[1],
                }
            }
        ],
    }


# --------------------------------------------------------------------------------------------
# patient


def render_patient(
    st: OrgStore,
    h: History,
    demo: SourceDemographics,
    pid: str,
    mrn: str,
    gp: Clinician | None,
    when: datetime,
    version: int,
) -> Resource:
    """The org's Patient: MRN (or member id), noisy name/address/telecom, US Core extensions."""
    org = st.org
    p = h.person
    race = next(r for r in demographics.RACES if r[0] == p.race)
    eth = next(e for e in demographics.ETHNICITIES if e[0] == p.ethnicity)
    profiles = [codes.US_CORE + "us-core-patient"]
    id_type = ("MR", "Medical record number")
    if org.kind == "payer":
        profiles = [codes.C4BB + "C4BB-Patient"]
        id_type = ("MB", "Member Number")
    identifiers: list[dict[str, Any]] = [
        {
            "use": "usual",
            "type": {"coding": [coding(codes.V2_0203, *id_type)], "text": id_type[1]},
            "system": org.mrn_system,
            "value": mrn,
            "assigner": {"display": org.name},
        }
    ]
    if demo.ssn:
        identifiers.append(
            {
                "use": "official",
                "type": {"coding": [coding(codes.V2_0203, "SS", "Social Security number")]},
                "system": codes.SSN_SYSTEM,
                "value": demo.ssn.replace("-", "") if org.id_style == "numeric" else demo.ssn,
            }
        )
    given = [demo.given] + ([demo.middle] if demo.middle else [])
    names: list[dict[str, Any]] = [{"use": "official", "family": demo.family, "given": given}]
    if demo.maiden_recorded:
        names.append({"use": "maiden", "family": demo.maiden_recorded, "given": [demo.given]})
    telecom: list[dict[str, Any]] = []
    if demo.phone:
        telecom.append({"system": "phone", "value": demo.phone, "use": "home"})
    if demo.email:
        telecom.append({"system": "email", "value": demo.email})
    addresses = [address(demo.address)]
    if (
        demo.address == p.address
        and p.previous_address
        and org.kind == "ehr"
        and "old" not in demo.noise
    ):
        # some EHRs keep the address history
        addresses.append(address(p.previous_address, period_end=day(when - timedelta(days=400))))
    resource: Resource = {
        "resourceType": "Patient",
        "id": pid,
        "meta": meta(when, *profiles, version=version),
        "extension": [
            {
                "url": codes.US_CORE + "us-core-race",
                "extension": [
                    {"url": "ombCategory", "valueCoding": coding(codes.CDC_RACE, race[0], race[1])},
                    {"url": "text", "valueString": race[1]},
                ],
            },
            {
                "url": codes.US_CORE + "us-core-ethnicity",
                "extension": [
                    {"url": "ombCategory", "valueCoding": coding(codes.CDC_RACE, eth[0], eth[1])},
                    {"url": "text", "valueString": eth[1]},
                ],
            },
            {
                "url": codes.US_CORE + "us-core-birthsex",
                "valueCode": "F" if p.gender == "female" else "M",
            },
        ],
        "identifier": identifiers,
        "active": True,
        "name": names,
        "telecom": telecom,
        "gender": p.gender,
        "birthDate": demo.birth_date,
        "address": addresses,
        "maritalStatus": {
            "coding": [
                coding(
                    demographics.MARITAL_STATUS_SYSTEM,
                    p.marital_status,
                    demographics.MARITAL_STATUS[p.marital_status],
                )
            ]
        },
        "communication": [
            {
                "language": {
                    "coding": [
                        coding("urn:ietf:bcp:47", p.language, demographics.LANGUAGES[p.language])
                    ]
                },
                "preferred": True,
            }
        ],
    }
    if not telecom:
        del resource["telecom"]
    if gp is not None:
        resource["generalPractitioner"] = [
            ref(
                "Practitioner",
                st.rid("Practitioner", gp.npi),
                f"{gp.given} {gp.family}, {gp.qualification[0]}",
            )
        ]
    resource["managingOrganization"] = ref("Organization", st.rid("Organization", "self"), org.name)
    return st.put(resource)

"""generate_population(): persons, their care histories and every organization's FHIR resources."""

import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.errors import GeneratorError
from medblocks_sandbox.generator import people, render, render_common, render_encounters, render_org
from medblocks_sandbox.generator.history import History, make_history
from medblocks_sandbox.generator.model import (
    OrgInfo,
    PersonTruth,
    PopulationSpec,
    PortalLogin,
)

Resource = dict[str, Any]


@dataclass
class SourcePatient:
    """One person's registration at one organization."""

    org_id: str
    patient_id: str
    mrn: str
    person_id: str
    demographics: people.SourceDemographics


@dataclass
class Population:
    """A generated world: organizations, persons, each org's resources and the ground truth.

    Resources are kept per organization in insertion order; `evolve()` edits them in place.
    """

    spec: PopulationSpec
    organizations: list[OrgInfo]
    persons: list[PersonTruth]
    histories: list[History]
    stores: dict[str, render_common.OrgStore]
    sources: list[SourcePatient]
    logins: list[PortalLogin]
    rosters: dict[str, list[render_common.Clinician]]
    # (org_id, duplicate patient id, main patient id): one person registered twice at one org
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    merged: list[tuple[str, str, str]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    # --- organizations ---
    def org(self, org_id: str) -> OrgInfo:
        """The organization with this id (KeyError if unknown)."""
        for o in self.organizations:
            if o.id == org_id:
                return o
        raise KeyError(org_id)

    @property
    def org_ids(self) -> list[str]:
        """Organization ids in declaration order."""
        return [o.id for o in self.organizations]

    # --- resources ---
    def resources_for(self, org_id: str, resource_type: str | None = None) -> list[Resource]:
        """Every FHIR resource held at the org (optionally one type), in a stable order."""
        store = self.stores[org_id]
        if resource_type is None:
            return list(store.resources.values())
        return [r for (t, _), r in store.resources.items() if t == resource_type]

    def patients_for(self, org_id: str) -> list[Resource]:
        """The org's Patient resources."""
        return self.resources_for(org_id, "Patient")

    def get(self, org_id: str, resource_type: str, resource_id: str) -> Resource | None:
        """One resource by type and id, or None."""
        return self.stores[org_id].resources.get((resource_type, resource_id))

    def counts(self) -> dict[str, dict[str, int]]:
        """Resource counts per org and type."""
        out: dict[str, dict[str, int]] = {}
        for org_id, store in self.stores.items():
            c: dict[str, int] = {}
            for t, _ in store.resources:
                c[t] = c.get(t, 0) + 1
            out[org_id] = dict(sorted(c.items()))
        return out

    @property
    def resource_count(self) -> int:
        """Total resources across organizations."""
        return sum(len(s.resources) for s in self.stores.values())

    # --- ground truth ---
    @property
    def truth(self) -> list[tuple[str, str, str]]:
        """(org_id, source_patient_id, person_id) for every source patient."""
        return [(s.org_id, s.patient_id, s.person_id) for s in self.sources]

    @property
    def fact_truth(self) -> list[tuple[str, str, str, str]]:
        """(fact_id, org_id, resource_type, resource_id): where each clinical fact appears."""
        out: list[tuple[str, str, str, str]] = []
        for store in self.stores.values():
            out.extend(store.facts)
        return out

    def person(self, person_id: str) -> PersonTruth:
        """A person's true demographics."""
        for p in self.persons:
            if p.person_id == person_id:
                return p
        raise KeyError(person_id)

    def person_of(self, org_id: str, patient_id: str) -> str | None:
        """The person behind a source patient id, or None."""
        for s in self.sources:
            if s.org_id == org_id and s.patient_id == patient_id:
                return s.person_id
        return None


def _duplicate_encounters(rng: random.Random, h: History, org: OrgInfo) -> list[Any]:
    """Encounters a duplicate registration at `org` would hold (none most of the time)."""
    own = [e for e in h.encounters if e.org == org.id]
    if len(own) < 2 or rng.random() >= 0.05:
        return []
    emergency = [e for e in own if e.kind == "emergency"]
    return emergency[:1] or own[-1:]


def _username(demo: people.SourceDemographics, taken: set[str]) -> str:
    base = (
        re.sub(r"[^a-z]", "", demo.given.lower()) + "." + re.sub(r"[^a-z]", "", demo.family.lower())
    )
    name = base
    i = 2
    while name in taken:
        name = f"{base}{i}"
        i += 1
    taken.add(name)
    return name


def _password(rng: random.Random) -> str:
    alphabet = "abcdefghjkmnpqrstuvwxyzACDEFGHJKLMNPQRTUVWXY346789"
    return "".join(rng.choice(alphabet) for _ in range(12))


def generate_population(spec: PopulationSpec | None = None) -> Population:
    """Generate a deterministic world for `spec` (same seed -> same resources, byte for byte)."""
    spec = spec or PopulationSpec()
    if spec.persons < 0 or spec.years < 1 or not 0 <= spec.twin_rate <= 1:
        raise GeneratorError("PopulationSpec needs persons >= 0, years >= 1, 0 <= twin_rate <= 1")
    if spec.reference_date.tzinfo is None:
        raise GeneratorError("PopulationSpec.reference_date must be timezone-aware")
    ref_dt = spec.reference_date
    orgs = people.default_organizations()
    by_id = {o.id: o for o in orgs}
    rosters = {o.id: render_common.roster(o) for o in orgs if o.kind != "payer"}
    stores = {o.id: render_common.OrgStore(o, ceiling=render_common.instant(ref_dt)) for o in orgs}
    base_time = ref_dt - timedelta(days=365 * (spec.years + 2))
    for o in orgs:
        render_org.render_org_base(stores[o.id], rosters.get(o.id, []), base_time)

    persons: list[PersonTruth] = []
    i = 0
    while len(persons) < spec.persons:
        rng = random.Random(f"{spec.seed}:person:{i}")
        pid = f"person-{spec.seed}-{i:06d}"
        p = people.make_person(rng, pid, ref_dt.date())
        persons.append(p)
        i += 1
        if len(persons) < spec.persons and rng.random() < spec.twin_rate / 2:
            twin_rng = random.Random(f"{spec.seed}:person:{i}")
            persons.append(people.make_twin(twin_rng, p, f"person-{spec.seed}-{i:06d}"))
            i += 1

    histories: list[History] = []
    sources: list[SourcePatient] = []
    logins: list[PortalLogin] = []
    usernames: dict[str, set[str]] = {o.id: set() for o in orgs}
    by_person: dict[str, History] = {}
    duplicates: list[tuple[str, str, str]] = []
    for p in persons:
        rng = random.Random(f"{spec.seed}:history:{p.person_id}")
        sibling = by_person.get(p.twin_of) if p.twin_of else None
        h = make_history(rng, p, orgs, ref_dt, spec.years, family_of=sibling)
        histories.append(h)
        by_person[p.person_id] = h
        member_orgs = list(h.care_orgs)
        if h.payer_member:
            member_orgs += [o.id for o in orgs if o.kind == "payer"]
        for n_org, org_id in enumerate(member_orgs):
            org = by_id[org_id]
            st = stores[org_id]
            demo_rng = random.Random(f"{spec.seed}:demo:{p.person_id}:{org_id}")
            demo = people.noisy_copy(
                demo_rng,
                p,
                org,
                first_seen_before_marriage=p.maiden_name is not None
                and org.kind == "network"
                and n_org > 0
                and demo_rng.random() < 0.6,
            )
            if org.kind == "payer":
                mrn = f"SHP{demo_rng.randrange(10**8, 10**9)}"
            elif org.id_style == "numeric":
                mrn = f"{100000 + demo_rng.randrange(900000)}"
            else:
                mrn = f"{org_id[:1].upper()}{demo_rng.randrange(10**7, 10**8)}"
            patient_id = st.rid("Patient", p.person_id)
            own = [e for e in h.encounters if e.org == org_id]
            registered = (
                (own[0].start - timedelta(days=1))
                if own
                else (
                    h.coverage_start
                    if org.kind == "payer" and h.coverage_start
                    else ref_dt - timedelta(days=300)
                )
            )
            version = 1 + demo_rng.randrange(3)
            gp = rosters[org_id][0] if org.kind != "payer" else None
            render_org.render_patient(st, h, demo, patient_id, mrn, gp, registered, version)
            sources.append(SourcePatient(org_id, patient_id, mrn, p.person_id, demo))
            ctx = render_common.CareContext(h, patient_id, rosters.get(org_id, []))
            moved = _duplicate_encounters(demo_rng, h, org) if org.kind != "payer" else []
            if org.kind == "payer":
                render.render_payer(st, ctx, mrn, by_id, rosters, ref_dt)
            else:
                render.render_care_org(
                    st, ctx, by_id, ref_dt, exclude=frozenset(e.n for e in moved)
                )
            if moved:
                # a second registration of the same person at this org (an ED quick
                # registration, a clerk who did not find the chart): its own MRN, more noise
                dup_rng = random.Random(f"{spec.seed}:dup:{p.person_id}:{org_id}")
                dup_demo = people.noisy_copy(dup_rng, p, org, first_seen_before_marriage=False)
                dup_id = st.rid("Patient", p.person_id, "duplicate")
                dup_mrn = (
                    f"{mrn[:1]}{dup_rng.randrange(10**7, 10**8)}"
                    if not mrn.isdigit()
                    else f"{100000 + dup_rng.randrange(900000)}"
                )
                render_org.render_patient(
                    st, h, dup_demo, dup_id, dup_mrn, None, moved[0].start - timedelta(hours=1), 1
                )
                sources.append(SourcePatient(org_id, dup_id, dup_mrn, p.person_id, dup_demo))
                duplicates.append((org_id, dup_id, patient_id))
                dup_ctx = render_common.CareContext(h, dup_id, rosters[org_id])
                for e in moved:
                    render_encounters.render_encounter(st, dup_ctx, e)
            if org.kind in ("ehr", "payer"):
                logins.append(
                    PortalLogin(
                        org_id, _username(demo, usernames[org_id]), _password(demo_rng), patient_id
                    )
                )
    return Population(
        spec=spec,
        organizations=orgs,
        persons=persons,
        histories=histories,
        stores=stores,
        sources=sources,
        logins=logins,
        rosters=rosters,
        duplicates=duplicates,
    )


def parse_instant(s: str) -> datetime:
    """Parse a FHIR instant written by this generator."""
    return datetime.fromisoformat(s.replace("Z", "+00:00"))

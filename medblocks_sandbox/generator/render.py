"""Render histories into each organization's FHIR R4 resources (US Core on EHRs, CARIN BB at the
payer).

Each organization has its own id style, its own MRN system and a few habits of its own (Mercy
General references Medication resources, Valley Medical stamps labs with an effectivePeriod,
network orgs keep only year-precision onsets for problems they did not diagnose), so the same
fact looks a little different at each source, as it does in real life. Every rendered fact is
recorded in the fact ledger: (fact_id, org_id, resource_type, resource_id)."""

from datetime import datetime, timedelta

from medblocks_sandbox.generator.model import OrgInfo
from medblocks_sandbox.generator.render_claims import render_coverage, render_eob
from medblocks_sandbox.generator.render_clinical import (
    render_allergy,
    render_medication_request,
    render_problem,
)
from medblocks_sandbox.generator.render_common import CareContext, Clinician, OrgStore
from medblocks_sandbox.generator.render_encounters import (
    render_encounter,
    render_immunization,
    render_smoking,
)
from medblocks_sandbox.generator.render_observations import render_labs


def render_care_org(
    st: OrgStore,
    ctx: CareContext,
    orgs: dict[str, OrgInfo],
    reference: datetime,
    exclude: frozenset[int] = frozenset(),
) -> None:
    """Everything this care org holds about the patient (but encounters in `exclude`)."""
    h = ctx.h
    org_id = st.org.id
    own = [e for e in h.encounters if e.org == org_id and e.n not in exclude]
    first = own[0].start if own else reference - timedelta(days=400)
    for key in h.problem_lists.get(org_id, []):
        render_problem(st, ctx, key, first)
    for key in h.allergy_lists.get(org_id, []):
        render_allergy(st, ctx, key, first + timedelta(minutes=5))
    if own:
        render_smoking(st, ctx, own[-1].start + timedelta(minutes=8))
    for key in h.med_lists.get(org_id, []):
        med = h.meds[key]
        onset = h.conditions[key]
        after = [e for e in own if e.start >= onset]
        authored = after[0].start + timedelta(minutes=45) if after else max(onset, first)
        enc_id = st.rid("Encounter", ctx.person_id, str(after[0].n)) if after else None
        render_medication_request(
            st,
            ctx,
            med,
            f"med/{med}",
            authored,
            encounter_id=enc_id,
            reason_condition=key,
            status="active",
            clinician=ctx.clinicians[0],
        )
    for e in own:
        render_encounter(st, ctx, e)
    # results and vaccines from elsewhere that reached this org
    for e in h.encounters:
        if e.org != org_id and org_id in e.lab_copies:
            render_labs(st, ctx, e, None, orgs[e.org])
    for n, vkey, target in h.immunization_copies:
        if target == org_id:
            e = next(x for x in h.encounters if x.n == n)
            render_immunization(st, ctx, e, vkey, None)


def render_payer(
    st: OrgStore,
    ctx: CareContext,
    member_id: str,
    orgs: dict[str, OrgInfo],
    rosters: dict[str, list[Clinician]],
    reference: datetime,
) -> None:
    """Coverage and one EOB per covered encounter whose claim was processed by the ref date."""
    h = ctx.h
    assert h.coverage_start is not None
    cov_id = render_coverage(st, ctx, member_id, h.coverage_start)
    for e in h.encounters:
        if e.start < h.coverage_start:
            continue
        if e.end + timedelta(days=e.claim_lag_days) > reference:
            continue  # claims lag: not adjudicated yet
        render_eob(st, ctx, e, cov_id, orgs[e.org], rosters[e.org][e.practitioner])

"""evolve(): a deterministic change set for incremental syncs (_since, _lastUpdated, Bulk
`deleted`).

Step k happens on day k after the reference date. It adds new visits (an Encounter with its
vitals, sometimes a note, and the claim at the payer), updates existing resources (new telecom
on a Patient, a medication stopped, a problem made inactive; each with versionId + 1) and
deletes a few (an observation entered in error, a note withdrawn with its Binary). Every created
or updated resource carries the step's lastUpdated instant, later than anything generated
before, so `_since` a previous step returns exactly the changes."""

import copy
import random
from datetime import timedelta
from typing import Any

from medblocks_sandbox.errors import GeneratorError
from medblocks_sandbox.generator import (
    codes,
    people,
    render_claims,
    render_common,
    render_encounters,
)
from medblocks_sandbox.generator.history import _encounter
from medblocks_sandbox.generator.model import Changes
from medblocks_sandbox.generator.population import Population

Resource = dict[str, Any]


def _subject(r: Resource) -> str | None:
    for key in ("subject", "patient", "beneficiary"):
        v = r.get(key)
        if isinstance(v, dict) and isinstance(v.get("reference"), str):
            return v["reference"].removeprefix("Patient/")
    if r["resourceType"] == "Patient":
        return r["id"]
    return None


def evolve(pop: Population, step: int = 1) -> Changes:
    """Apply change step `step` (1, 2, ... in order, each once) to `pop` in place and return it."""
    if step < 1:
        raise GeneratorError("evolve steps start at 1")
    if step in pop.steps or (pop.steps and step < max(pop.steps)):
        raise GeneratorError(f"evolve step {step} already applied or out of order")
    rng = random.Random(f"{pop.spec.seed}:evolve:{step}")
    base = pop.spec.reference_date + timedelta(days=step)
    changes = Changes(step=step, last_updated=render_common.instant(base))
    stamp_n = 0

    def stamp() -> str:
        nonlocal stamp_n
        stamp_n += 1
        return render_common.instant(base + timedelta(seconds=stamp_n))

    for st in pop.stores.values():
        st.ceiling = None  # every resource this step touches is stamped explicitly below
    sources_by_person: dict[str, list[Any]] = {}
    for s in pop.sources:
        sources_by_person.setdefault(s.person_id, []).append(s)
    # index: (org, patient id) -> resource keys, built once per step
    index: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for org_id, st in pop.stores.items():
        for key, r in st.resources.items():
            subj = _subject(r)
            if subj:
                index.setdefault((org_id, subj), []).append(key)

    n_new = max(1, len(pop.histories) // 20)
    n_upd = max(1, len(pop.histories) // 25)
    n_del = max(1, len(pop.histories) // 50)
    order = list(range(len(pop.histories)))

    # --- new visits ---
    for hi in sorted(rng.sample(order, min(n_new, len(order)))):
        h = pop.histories[hi]
        org_id = h.care_orgs[0]
        st = pop.stores[org_id]
        src = next(s for s in sources_by_person[h.person.person_id] if s.org_id == org_id)
        n = 1000 * step + len([e for e in h.encounters if e.n >= 1000 * step])
        start = base - timedelta(hours=8 + rng.randrange(6))
        kind = "followup" if h.conditions else "acute"
        shift: dict[str, tuple[float, float]] = {}
        e = _encounter(
            rng,
            n,
            kind,
            org_id,
            start,
            h.conditions,
            shift,
            h.age,
            h.person,
            h.care_orgs,
            h.height_cm,
            h.bmi,
        )
        e.lab_copies = []
        e.claim_lag_days = 0
        h.encounters.append(e)
        ctx = render_common.CareContext(h, src.patient_id, pop.rosters[org_id])
        for cond in h.problem_lists.get(org_id, []):
            ctx.condition_ids[cond] = st.rid("Condition", h.person.person_id, cond)
        before = set(st.resources)
        render_encounters.render_encounter(st, ctx, e)
        for key in list(st.resources):
            if key not in before:
                r = st.resources[key]
                r["meta"]["lastUpdated"] = stamp()
                changes.created.append((org_id, r))
        if h.payer_member and h.coverage_start is not None:
            payer = next(o for o in pop.organizations if o.kind == "payer")
            pst = pop.stores[payer.id]
            psrc = next(s for s in sources_by_person[h.person.person_id] if s.org_id == payer.id)
            pctx = render_common.CareContext(h, psrc.patient_id, [])
            before = set(pst.resources)
            render_claims.render_eob(
                pst,
                pctx,
                e,
                pst.rid("Coverage", h.person.person_id),
                pop.org(org_id),
                pop.rosters[org_id][e.practitioner],
            )
            for key in list(pst.resources):
                if key not in before:
                    r = pst.resources[key]
                    r["meta"]["lastUpdated"] = stamp()
                    changes.created.append((payer.id, r))

    # --- updates ---
    for hi in sorted(rng.sample(order, min(n_upd, len(order)))):
        h = pop.histories[hi]
        src = rng.choice(sources_by_person[h.person.person_id])
        st = pop.stores[src.org_id]
        keys = index.get((src.org_id, src.patient_id), [])
        kind = rng.choice(("patient", "medication", "condition"))
        target = None
        if kind == "medication":
            cands = [
                k
                for k in keys
                if k[0] == "MedicationRequest" and st.resources.get(k, {}).get("status") == "active"
            ]
            target = cands[rng.randrange(len(cands))] if cands else None
            if target:
                r = copy.deepcopy(st.resources[target])
                r["status"] = "stopped"
                r["statusReason"] = {"text": "Stopped by prescriber"}
                r.pop("dispenseRequest", None)
        elif kind == "condition":
            cands = [
                k
                for k in keys
                if k[0] == "Condition"
                and st.resources.get(k, {})
                .get("clinicalStatus", {})
                .get("coding", [{}])[0]
                .get("code")
                == "active"
            ]
            target = cands[rng.randrange(len(cands))] if cands else None
            if target:
                r = copy.deepcopy(st.resources[target])
                r["clinicalStatus"] = {
                    "coding": [
                        codes.coding(
                            "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "inactive",
                            "Inactive",
                        )
                    ]
                }
                r["abatementDateTime"] = render_common.local(base - timedelta(days=1))
        if target is None:
            target = ("Patient", src.patient_id)
            r = copy.deepcopy(st.resources[target])
            r["telecom"] = [t for t in r.get("telecom", []) if t["system"] != "phone"]
            r["telecom"].insert(
                0, {"system": "phone", "value": people.make_phone(rng), "use": "mobile"}
            )
        r["meta"]["versionId"] = str(int(r["meta"]["versionId"]) + 1)
        r["meta"]["lastUpdated"] = stamp()
        st.resources[target] = r
        changes.updated.append((src.org_id, r))

    # --- deletions ---
    for hi in sorted(rng.sample(order, min(n_del, len(order)))):
        h = pop.histories[hi]
        src = rng.choice(sources_by_person[h.person.person_id])
        st = pop.stores[src.org_id]
        keys = [
            k
            for k in index.get((src.org_id, src.patient_id), [])
            if k in st.resources and k[0] in ("Observation", "DocumentReference")
        ]
        if not keys:
            continue
        key = keys[rng.randrange(len(keys))]
        doomed = [key]
        if key[0] == "DocumentReference":
            url = st.resources[key]["content"][0]["attachment"]["url"]
            doomed.append(("Binary", url.removeprefix("Binary/")))
        for k in doomed:
            if k in st.resources:
                del st.resources[k]
                changes.deleted.append((src.org_id, k[0], k[1]))
        gone = {(src.org_id, t, i) for t, i in doomed}
        st.facts[:] = [f for f in st.facts if (f[1], f[2], f[3]) not in gone]
    # --- merges: an org finds a duplicate registration and links it to the main chart ---
    touched = {(o, r["resourceType"], r["id"]) for o, r in changes.updated}
    for org_id, dup_id, main_id in pop.duplicates:
        if (org_id, dup_id, main_id) in pop.merged or rng.random() >= 0.5:
            continue
        if (org_id, "Patient", main_id) in touched or (org_id, "Patient", dup_id) in touched:
            continue
        st = pop.stores[org_id]
        dup = copy.deepcopy(st.resources[("Patient", dup_id)])
        main = copy.deepcopy(st.resources[("Patient", main_id)])
        dup["active"] = False
        dup["link"] = [{"other": render_common.ref("Patient", main_id), "type": "replaced-by"}]
        main["link"] = [{"other": render_common.ref("Patient", dup_id), "type": "replaces"}]
        for r in (main, dup):
            r["meta"]["versionId"] = str(int(r["meta"]["versionId"]) + 1)
            r["meta"]["lastUpdated"] = stamp()
            st.resources[("Patient", r["id"])] = r
            changes.updated.append((org_id, r))
        pop.merged.append((org_id, dup_id, main_id))
    pop.steps.append(step)
    return changes

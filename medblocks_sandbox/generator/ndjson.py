"""NDJSON output: a population per org and type with its ground truth beside it, and the streaming
scale path.

`stream_bulk_ndjson` is for millions of resources. It renders a small seeded population with the
same builders as `generate_population`, turns each source patient's resources into pre-compiled
format strings whose ids, dates, values and names are slots, and then writes copies of those
patient blocks straight to disk: no per-resource dict, no json.dumps, bounded buffers. Each copy
gets fresh ids (original id + a copy suffix), its dates shifted back by a per-copy number of
days, jittered quantities and a new name."""

import csv
import difflib
import functools
import json
import random
import re
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from medblocks_sandbox.errors import GeneratorError
from medblocks_sandbox.generator import demographics
from medblocks_sandbox.generator.model import PopulationSpec
from medblocks_sandbox.generator.population import Population, generate_population

Resource = dict[str, Any]


def dumps(resource: Resource) -> str:
    """Compact, stable JSON for one resource (key order is the builder's, which is fixed)."""
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False)


def write_ndjson(pop: Population, out_dir: str | Path) -> dict[str, Any]:
    """Write `<out>/<org>/<Type>.ndjson` for every org plus `<out>/truth/*` ground truth files.

    Truth files: identity.csv (org_id, source_patient_id, person_id), facts.csv (fact_id,
    org_id, resource_type, resource_id), persons.json, organizations.json, logins.csv.
    Returns counts and paths.
    """
    out = Path(out_dir)
    files: list[str] = []
    for org in pop.organizations:
        d = out / org.id
        d.mkdir(parents=True, exist_ok=True)
        by_type: dict[str, list[str]] = {}
        for r in pop.resources_for(org.id):
            by_type.setdefault(r["resourceType"], []).append(dumps(r))
        for rtype in sorted(by_type):
            path = d / f"{rtype}.ndjson"
            path.write_text("\n".join(by_type[rtype]) + "\n", encoding="utf-8")
            files.append(str(path))
    truth = out / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    _csv(truth / "identity.csv", ("org_id", "source_patient_id", "person_id"), pop.truth)
    _csv(truth / "facts.csv", ("fact_id", "org_id", "resource_type", "resource_id"), pop.fact_truth)
    _csv(
        truth / "logins.csv",
        ("org_id", "username", "password", "patient_id"),
        [(x.org_id, x.username, x.password, x.patient_id) for x in pop.logins],
    )
    (truth / "persons.json").write_text(
        json.dumps([asdict(p) for p in pop.persons], indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    (truth / "organizations.json").write_text(
        json.dumps([asdict(o) for o in pop.organizations], indent=1) + "\n", encoding="utf-8"
    )
    files += [
        str(truth / n)
        for n in ("identity.csv", "facts.csv", "logins.csv", "persons.json", "organizations.json")
    ]
    return {
        "out_dir": str(out),
        "resources": pop.resource_count,
        "counts": pop.counts(),
        "files": files,
    }


def _csv(path: Path, header: tuple[str, ...], rows: Any) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------
# the scale path

# One pass over each resource's JSON finds every slot. Each alternative matches its context
# literally and captures only the token, so the scan stays linear (no lookbehind per position).
_SLOT_PATTERN = (
    r'"(?:id|reference)":"(?:[A-Z][A-Za-z]+/)?(?P<id>[^"]+)"'
    r'|"url":"Binary/(?P<binary>[^"]+)"'
    r"|(?<![0-9A-Za-z-])(?P<date>\d{4}-\d{2}-\d{2})(?![0-9-])"
    r'|"valueQuantity":\{"value":(?P<value>-?\d+(?:\.\d+)?)'
    r'|"family":"(?P<family>[^"]+)"'
    r'|"system":"http://hl7\.org/fhir/sid/us-ssn","value":"(?P<ssn>[^"]+)"'
    r'|"system":"phone","value":"(?P<phone>[^"]+)"'
    r'|"system":"email","value":"(?P<email>[^"]+)"'
    r'|"type":"physical","line":\["(?P<line>[^"]+)"'
    r'|"subscriberId":"(?P<mrn>[^"]+)"'
)


class _Block:
    """A family's resources (a person, or twins) at every selected org, compiled to format strings.

    Slots: resource ids (copy suffix), dates (shifted back), quantities (jittered) and the
    identity fields of Patient/Coverage (family names, MRNs / member ids, SSN, phone, e-mail,
    street line), so each copy is a new family whose records still link across orgs exactly as
    the originals did, and whose ground truth is known.
    """

    def __init__(
        self,
        resources: list[tuple[str, Resource]],
        sources: list[tuple[str, str, str]],
        true_names: list[str],
        mrn_systems: list[str],
    ) -> None:
        self.orgs: list[str] = [org for org, _ in resources]
        self.types: list[str] = [r["resourceType"] for _, r in resources]
        self.sources = sources  # (org, patient id, person id); Patients lead the block in order
        # fact ledger rows of this block: (resource index, person id, fact path, org, type, id)
        self.facts: list[tuple[int, str, str, str, str, str]] = []
        self.true_names = true_names
        ids = {r["id"] for _, r in resources}
        self.id_slots: list[tuple[str, str]] = []
        self.date_slots: list[tuple[str, int]] = []
        self.value_slots: list[tuple[str, float, int]] = []
        # family-name slots: (slot, index of the true name, is a misspelling of it)
        self.name_slots: list[tuple[str, int, bool]] = []
        self.ident_slots: list[tuple[str, str, str]] = []  # (slot, kind, original token)
        names: dict[str, str] = {}
        self._ids = ids
        self._slots = _compile_slots(tuple(mrn_systems))
        self.templates: list[str] = []
        for _, r in resources:
            # the newline is part of the template: one format_map per line, no concatenation
            self.templates.append(self._compile(dumps(r), names) + "\n")
        counts: dict[str, int] = {}
        for t in self.types:
            counts[t] = counts.get(t, 0) + 1
        self.type_counts = list(counts.items())
        self.approx_bytes = sum(len(t) for t in self.templates)

    def _slot(self, names: dict[str, str], key: str) -> tuple[str, bool]:
        if key in names:
            return names[key], False
        names[key] = f"s{len(names)}"
        return names[key], True

    def _compile(self, text: str, names: dict[str, str]) -> str:
        out: list[str] = []
        pos = 0
        for m in self._slots.finditer(text):
            group = kind = m.lastgroup or ""
            token = m.group(group)
            if kind in ("id", "binary"):
                if token not in self._ids:
                    continue  # a shared resource (Practitioner, Organization ...) or a URL
                kind = "id"
            start, end = m.span(group)
            out.append(text[pos:start].replace("{", "{{").replace("}", "}}"))
            if kind == "value":
                name, _ = self._slot(names, f"value:{len(names)}")
                decimals = len(token.split(".")[1]) if "." in token else 0
                self.value_slots.append((name, float(token), decimals))
            else:
                name, new = self._slot(names, f"{kind}:{token}")
                if new and kind == "id":
                    self.id_slots.append((name, token))
                elif new and kind == "date":
                    self.date_slots.append((name, date.fromisoformat(token).toordinal()))
                elif new and kind == "family":
                    self.name_slots.append((name, *self._name_role(token)))
                elif new:
                    self.ident_slots.append((name, "mrn" if kind == "mrn2" else kind, token))
            out.append("{" + name + "}")
            pos = end
        out.append(text[pos:].replace("{", "{{").replace("}", "}}"))
        return "".join(out)

    def _name_role(self, token: str) -> tuple[int, bool]:
        if token in self.true_names:
            return self.true_names.index(token), False
        # a misspelt name: the true name it is closest to
        best = max(
            range(len(self.true_names)),
            key=lambda i: difflib.SequenceMatcher(None, token, self.true_names[i]).ratio(),
        )
        return best, True


@functools.lru_cache(maxsize=8)
def _compile_slots(mrn_systems: tuple[str, ...]) -> re.Pattern[str]:
    mrn = "|".join(re.escape(m) for m in mrn_systems)
    extra = f'|"system":"(?:{mrn})","value":"(?P<mrn2>[^"]+)"' if mrn else ""
    return re.compile(_SLOT_PATTERN + extra)


def _subject_of(r: Resource, binary_owner: dict[str, str]) -> str | None:
    if r["resourceType"] == "Patient":
        return str(r["id"])
    if r["resourceType"] == "Binary":
        return binary_owner.get(r["id"])
    for key in ("subject", "patient", "beneficiary"):
        v = r.get(key)
        if isinstance(v, dict) and "reference" in v:
            return str(v["reference"]).removeprefix("Patient/")
    return None


def _blocks(pop: Population, org_ids: list[str]) -> tuple[list[tuple[str, Resource]], list[_Block]]:
    """Shared resources (org, resource) and one block per family (a person or a pair of twins)."""
    shared: list[tuple[str, Resource]] = []
    family_of = {p.person_id: p.twin_of or p.person_id for p in pop.persons}
    families: dict[str, list[tuple[str, Resource]]] = {}
    sources: dict[str, list[tuple[str, str, str]]] = {}
    person_of = {(o, pid): person for o, pid, person in pop.truth}
    for org_id in org_ids:
        binary_owner = {
            r["content"][0]["attachment"]["url"].removeprefix("Binary/"): r["subject"][
                "reference"
            ].removeprefix("Patient/")
            for r in pop.resources_for(org_id, "DocumentReference")
        }
        for r in pop.resources_for(org_id):
            subj = _subject_of(r, binary_owner)
            if subj is None:
                shared.append((org_id, r))
                continue
            fam = family_of[person_of[(org_id, subj)]]
            families.setdefault(fam, []).append((org_id, r))
            if r["resourceType"] == "Patient":
                sources.setdefault(fam, []).append((org_id, r["id"], person_of[(org_id, subj)]))
    persons = {p.person_id: p for p in pop.persons}
    facts_by_family: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in pop.fact_truth:
        if row[1] in org_ids:
            facts_by_family.setdefault(family_of[row[0].partition("/")[0]], []).append(row)
    mrn_systems = tuple(sorted(o.mrn_system for o in pop.organizations if o.id in org_ids))
    blocks = []
    for fam, res in families.items():
        # Patients first, in source order, so a count cut mid-block never orphans a resource
        res.sort(key=lambda x: x[1]["resourceType"] != "Patient")
        true_names: list[str] = []
        for _, _, person_id in sources.get(fam, []):
            p = persons[person_id]
            for n in (p.family, p.maiden_name):
                if n and n not in true_names:
                    true_names.append(n)
        block = _Block(res, sources.get(fam, []), true_names, list(mrn_systems))
        position = {(org, r["resourceType"], r["id"]): i for i, (org, r) in enumerate(res)}
        for fact, org, rtype, rid in facts_by_family.get(fam, []):
            person, _, path = fact.partition("/")
            block.facts.append((position[(org, rtype, rid)], person, path, org, rtype, rid))
        block.facts.sort()
        blocks.append(block)
    return shared, blocks


@functools.lru_cache(maxsize=4)
def _compiled(
    seed: int, orgs: tuple[str, ...] | None, persons: int
) -> tuple[list[tuple[str, Resource]], list[_Block]]:
    # compiled blocks are read-only: repeated calls with one seed reuse them
    pop = generate_population(PopulationSpec(seed=seed, persons=persons, twin_rate=0.15))
    return _blocks(pop, list(orgs) if orgs else pop.org_ids)


def _respell(rng: random.Random, name: str) -> str:
    from medblocks_sandbox.generator.people import typo

    return typo(rng, name)


def stream_bulk_ndjson(
    out_dir: str | Path,
    *,
    resources: int,
    seed: int,
    files_per_type: int = 1,
    orgs: list[str] | None = None,
    per_org: bool = False,
    truth: bool = False,
    buffer_bytes: int = 4 << 20,
    sample_persons: int | None = None,
) -> dict[str, Any]:
    """Write exactly `resources` FHIR resources as NDJSON under `out_dir`, streaming.

    Shapes come from a small population rendered by the regular builders (`orgs`: which orgs'
    shapes, default all), grouped by family (a person, or twins) across orgs. Each copy of a
    family is a new family: fresh ids, dates shifted back, jittered quantities, a new family
    name (misspelt where the original was), new MRNs/member ids, SSN, phone, e-mail and street,
    while its records link across orgs exactly as the originals did.

    Files are `<Type>.ndjson`, or `<Type>.<nnn>.ndjson` with several files per type (family
    copies go round-robin over them); `per_org` puts them under `<out>/<org>/`. `truth` also
    writes `<out>/truth/identity.csv` (org_id, source_patient_id, person_id) and
    `<out>/truth/facts.csv` (fact_id, org_id, resource_type, resource_id). Memory stays
    bounded by the sample (`sample_persons`, default 16, or 48 above 200k resources) and
    `buffer_bytes` (all buffers together). Returns stats: resources,
    bytes, seconds, patients (family copies), by_type, files.
    """
    if resources < 0 or files_per_type < 1:
        raise GeneratorError("resources must be >= 0 and files_per_type >= 1")
    t0 = time.perf_counter()
    # more sample families for big runs: more distinct histories, compile cost paid once
    sample = sample_persons or (16 if resources <= 200_000 else 48)
    shared, blocks = _compiled(seed, tuple(orgs) if orgs else None, sample)
    if not blocks:
        raise GeneratorError("no patient blocks to stream from the selected orgs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:stream")
    # pools drawn once: the per-copy work is dict lookups and str.format_map
    noise = [1 + rng.gauss(0, 0.06) for _ in range(4093)]
    families = list(demographics.FAMILY_NAMES)
    types = sorted({t for b in blocks for t in b.types} | {r["resourceType"] for _, r in shared})

    def file_name(org: str, rtype: str, fileno: int) -> str:
        base = f"{rtype}.ndjson" if files_per_type == 1 else f"{rtype}.{fileno:03d}.ndjson"
        return f"{org}/{base}" if per_org else base

    # one buffer (a list of lines) per output file; blocks append to them directly
    buffers: dict[str, list[str]] = {}
    handles: dict[str, TextIO] = {}
    counts: dict[str, int] = {}
    by_type: dict[str, int] = dict.fromkeys(types, 0)
    total_bytes = 0
    pending = 0

    def buffer(name: str) -> list[str]:
        buf = buffers.get(name)
        if buf is None:
            buf = buffers[name] = []
            counts[name] = 0
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            handles[name] = path.open("w", encoding="utf-8", newline="\n")
        return buf

    def flush() -> None:
        nonlocal total_bytes, pending
        for name, buf in buffers.items():
            if buf:
                data = "".join(buf)
                handles[name].write(data)
                if name.endswith(".ndjson"):
                    total_bytes += len(data) if data.isascii() else len(data.encode("utf-8"))
                    counts[name] += len(buf)
                buf.clear()
        pending = 0

    truth_buf = buffer("truth/identity.csv") if truth else None
    facts_buf = buffer("truth/facts.csv") if truth else None
    if truth_buf is not None and facts_buf is not None:
        truth_buf.append("org_id,source_patient_id,person_id\n")
        facts_buf.append("fact_id,org_id,resource_type,resource_id\n")
    # per block and file number: the buffers its resources go to, resolved once
    routes: dict[tuple[int, int], list[list[str]]] = {}
    written = 0
    copy = 0
    try:
        for org, r in shared[:resources]:
            buffer(file_name(org, r["resourceType"], 0)).append(dumps(r) + "\n")
            by_type[r["resourceType"]] += 1
            written += 1
        date_cache: dict[int, str] = {}
        while written < resources:
            bi = copy % len(blocks)
            block = blocks[bi]
            fileno = copy % files_per_type
            route = routes.get((bi, fileno))
            if route is None:
                route = routes[(bi, fileno)] = [
                    buffer(file_name(o, t, fileno))
                    for o, t in zip(block.orgs, block.types, strict=True)
                ]
            suffix = f"-{copy:x}"
            subs: dict[str, str] = {name: orig + suffix for name, orig in block.id_slots}
            shift = rng.randrange(0, 700)
            for name, ordinal in block.date_slots:
                o = ordinal - shift
                d = date_cache.get(o)
                if d is None:
                    d = date_cache[o] = date.fromordinal(o).isoformat()
                subs[name] = d
            ni = rng.randrange(len(noise))
            for name, value, decimals in block.value_slots:
                ni = ni + 1 if ni + 1 < len(noise) else 0
                v = value * noise[ni]
                subs[name] = str(round(v, decimals)) if decimals else str(round(v))
            if block.name_slots:
                new_names = []
                for _ in block.true_names:
                    n = families[rng.randrange(len(families))]
                    if rng.random() < 0.2:  # double-barrelled names widen the pool
                        n = f"{n}-{families[rng.randrange(len(families))]}"
                    new_names.append(n)
                for name, role, misspelt in block.name_slots:
                    n = new_names[role]
                    subs[name] = _respell(rng, n) if misspelt else n
            for name, kind, token in block.ident_slots:
                if kind == "mrn":
                    subs[name] = token + suffix
                elif kind == "ssn":
                    digits = f"9{rng.randrange(100):02d}{rng.randrange(1, 100):02d}"
                    digits += f"{rng.randrange(1, 10000):04d}"
                    subs[name] = (
                        f"{digits[:3]}-{digits[3:5]}-{digits[5:]}" if "-" in token else digits
                    )
                elif kind == "phone":
                    subs[name] = f"{token[:8]}{rng.randrange(10000):04d}"
                elif kind == "email":
                    local_part, _, domain = token.partition("@")
                    subs[name] = f"{local_part[:1]}{rng.randrange(10**6)}.{copy:x}@{domain}"
                else:  # street line: a new house number on the same street
                    subs[name] = f"{rng.randrange(10, 9999)} {token.split(' ', 1)[-1]}"
            left = resources - written
            n_emit = min(left, len(block.templates))
            if n_emit == len(block.templates):
                for buf, tmpl in zip(route, block.templates, strict=True):
                    buf.append(tmpl.format_map(subs))
                for t, cnt in block.type_counts:
                    by_type[t] += cnt
                pending += block.approx_bytes
            else:
                # the last, partial copy: Patients lead, so nothing is left without its patient
                for buf, tmpl, t in zip(route, block.templates, block.types, strict=False):
                    if n_emit == 0:
                        break
                    buf.append(tmpl.format_map(subs))
                    by_type[t] += 1
                    n_emit -= 1
                n_emit = min(left, len(block.templates))
            if truth_buf is not None:
                for org, pid, person in block.sources[:n_emit]:
                    truth_buf.append(f"{org},{pid}{suffix},{person}{suffix}\n")
            if facts_buf is not None:
                for idx, person, path, org, rtype, rid in block.facts:
                    if idx >= n_emit:
                        break
                    facts_buf.append(f"{person}{suffix}/{path},{org},{rtype},{rid}{suffix}\n")
            written += n_emit
            copy += 1
            if pending >= buffer_bytes:
                flush()
    finally:
        flush()
        for h in handles.values():
            h.close()
    return {
        "resources": written,
        "bytes": total_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "patients": copy,
        "by_type": {t: n for t, n in by_type.items() if n},
        "files": {k: v for k, v in sorted(counts.items()) if k.endswith(".ndjson")},
    }

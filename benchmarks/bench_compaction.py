"""Lake compaction: a warehouse build over many small patient-access pull files, before and after
compaction, same lake, same run.

    .venv/bin/python benchmarks/bench_compaction.py [--pulls N]

N pulls (default 2,000) each land one connection's resources as a patient-access pull does: one
small Parquet file per resource type per pull. The base-table build (``steps=[]``) runs over the
small files (baseline), then compaction rewrites each folder into one file, then the same build
runs again. Prints both build times, the compaction time, the ratio, and peak RSS.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pulls", type=int, default=2000)
    args = ap.parse_args()

    from medblocks_pipelines.lib.settings import Settings
    from medblocks_pipelines.lib.warehouse.build import build_warehouse
    from medblocks_pipelines.lib.warehouse.compaction import compact_tenant
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    pop = generate_population(PopulationSpec(seed=21, persons=max(10, args.pulls // 10)))
    org = pop.organizations[0].id
    by_patient: dict[str, list[str]] = {}
    for r in pop.resources_for(org):
        ref = (r.get("subject") or r.get("patient") or {}).get("reference", "")
        key = r["id"] if r["resourceType"] == "Patient" else ref.rpartition("/")[2]
        if key:
            by_patient.setdefault(key, []).append(json.dumps(r))
    patients = sorted(by_patient)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(root, f"sqlite:///{root / 'c.db'}", root / "lake", root / "wh")
        settings.ensure_dirs()
        t0 = time.perf_counter()
        rows = 0
        for i in range(args.pulls):
            pid = patients[i % len(patients)]
            prov = Provenance("bench", "patient_access", "src", org, f"conn-{pid}", f"run-{i}")
            with LakeWriter(settings.lake, prov) as w:
                for text in by_patient[pid]:
                    w.add(text)
                    rows += 1
        t_land = time.perf_counter() - t0
        files = len(list(settings.lake_root.rglob("*.parquet")))
        print(f"{args.pulls:,} pulls landed {rows:,} rows into {files:,} files in {t_land:.1f} s")

        build_warehouse("bench", settings=settings, steps=[], options={"compact": False})  # warm
        t0 = time.perf_counter()
        before = build_warehouse("bench", settings=settings, steps=[], options={"compact": False})
        t_before = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = compact_tenant(settings.lake, "bench", min_files=2)
        t_compact = time.perf_counter() - t0
        t0 = time.perf_counter()
        after = build_warehouse("bench", settings=settings, steps=[], options={"compact": False})
        t_after = time.perf_counter() - t0
        assert before.table_counts == after.table_counts, "compaction changed the warehouse"
        print(
            f"compaction: {stats.files_in:,} files -> {stats.files_out} in {t_compact:.1f} s "
            f"({stats.bytes_in / 1e6:.1f} MB -> {stats.bytes_out / 1e6:.1f} MB)"
        )
        print(
            f"build over small files {t_before:.2f} s, after compaction {t_after:.2f} s, "
            f"ratio {t_before / t_after:.1f}x"
        )
        print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

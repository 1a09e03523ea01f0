"""Bulk ingest: sandbox NDJSON export -> landed lake -> warehouse base tables, beside DuckDB's own
`read_json` of the same files, measured in the same run.

    .venv/bin/python benchmarks/bench_bulk_ingest.py [--resources N] [--parallel P]

Generates N resources (default 1,000,000) with the sandbox generator's streaming path and serves
them from a sandbox EHR in a child process (SMART backend auth + Bulk Data, files as generated).
Then, in this process: kick-off, poll, parallel download, landing (`LakeWriter.add_ndjson_file`),
watermark and DELETE (`sync_organization`), and `build_warehouse(..., steps=[])` for the base
tables. The baseline, in its own child process: DuckDB `read_json` of the same files into one
table per resource type of a DuckDB file. Prints resources/s and MB/s for both, the ratio
(target >= 0.5), and peak RSS of each process (target <= 1 GiB for ours).

The FHIR validation at the landing door (lib/fhir/validate.py) is measured in the same run: after
the main run (which pays the cold start), two more full syncs of the same export into new tenants,
validation off (MEDBLOCKS_BENCH_SKIP_VALIDATION=1, a switch for this benchmark only) then on, give
the cost of the checks as a share of the whole ingest (target <= 20%).
``--skip-validation-baseline`` leaves them out.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bulk_download import generate, peak_rss_mib, prepare_registry, start_server  # noqa: E402


def baseline(directory: str) -> None:
    """Child process: DuckDB read_json of every file, one table per type; prints JSON."""
    import duckdb

    by_type: dict[str, list[str]] = defaultdict(list)
    for path in sorted(Path(directory).glob("*.ndjson*")):
        by_type[path.name.split(".", 1)[0]].append(str(path))
    out = Path(directory).parent / "baseline.duckdb"
    t0 = time.perf_counter()
    con = duckdb.connect(str(out))
    con.execute("SET preserve_insertion_order=false")
    rows = 0
    for rtype, files in sorted(by_type.items()):
        con.execute(
            f"CREATE TABLE \"{rtype}\" AS SELECT * FROM read_json(?, format='newline_delimited', "
            "union_by_name=true, maximum_object_size=67108864)",
            [files],
        )
        got = con.execute(f'SELECT count(*) FROM "{rtype}"').fetchone()
        rows += int(got[0]) if got else 0
    con.close()
    seconds = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's over fork/exec).
    hwm = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    print(json.dumps({"seconds": seconds, "rows": rows, "rss_mib": hwm / 1024}))


def _ingest_again(cp: Any, settings: Any, tenant: str, *, validate: bool) -> tuple[float, float]:
    """The same export synced again into a new tenant, FHIR checks on or off.

    Returns wall and CPU seconds (this process) of download + landing + base tables."""
    from medblocks_pipelines.lib.fhir.bulk_sync import sync_organization
    from medblocks_pipelines.lib.warehouse.build import build_warehouse

    cp.add_tenant(tenant, tenant)
    cp.add_organization(f"{tenant}-org", tenant, "bench-ehr", tenant, {"level": "system"})
    if not validate:
        os.environ["MEDBLOCKS_BENCH_SKIP_VALIDATION"] = "1"
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        report = sync_organization(
            cp,
            settings,
            tenant,
            f"{tenant}-org",
            run_id=f"{tenant}-run",
            min_wait=0.05,
            timeout=3600,
        )
        build_warehouse(tenant, settings=settings, steps=[], control_plane=cp, run_id=tenant)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        os.environ.pop("MEDBLOCKS_BENCH_SKIP_VALIDATION", None)
    assert report.quarantined == 0, report.as_metadata()
    return seconds, cpu


def validation_cost(cp: Any, settings: Any) -> None:
    """Print the FHIR validation's share of the ingest: warm runs, off then on, same export."""
    off = _ingest_again(cp, settings, "plain", validate=False)
    on = _ingest_again(cp, settings, "checked", validate=True)
    # CPU seconds of this process too: on a shared machine wall time is mostly noise.
    print(
        f"FHIR validation (warm runs): off {off[0]:.1f} s ({off[1]:.1f} CPU s), on {on[0]:.1f} s "
        f"({on[1]:.1f} CPU s): costs {(on[0] - off[0]) / off[0]:+.1%} wall, "
        f"{(on[1] - off[1]) / off[1]:+.1%} CPU of the ingest (target <= 20%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=1_000_000)
    parser.add_argument("--files-per-type", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--gzip", action="store_true", help="Ask for gzip (server compresses).")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--skip-validation-baseline",
        action="store_true",
        help="Do not run the second sync without FHIR validation.",
    )
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]), int(args.generate[2]))
        return
    if args.baseline:
        baseline(args.baseline)
        return

    from medblocks_pipelines.lib.fhir.bulk_sync import sync_organization
    from medblocks_pipelines.lib.warehouse.build import build_warehouse

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-ingest-"))
    proc = None
    try:
        t0 = time.perf_counter()
        # In a child process: the generator's memory is not the ingest's.
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--generate",
                str(work / "src"),
                str(args.resources),
                str(args.files_per_type),
            ],
            check=True,
        )
        src_bytes = sum(p.stat().st_size for p in (work / "src").glob("*.ndjson*"))
        mb = src_bytes / 1e6
        print(
            f"generated {args.resources:,} resources, {mb:,.0f} MB NDJSON in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        proc, base = start_server(work / "src", work)
        settings, cp = prepare_registry(base, work / "data", parallel=args.parallel, gzip=args.gzip)

        t0 = time.perf_counter()
        report = sync_organization(
            cp, settings, "bench", "bench-org", run_id="bench-run", min_wait=0.05, timeout=3600
        )
        t_land = time.perf_counter() - t0
        rss_land = peak_rss_mib()
        t1 = time.perf_counter()
        built = build_warehouse(
            "bench", settings=settings, steps=[], control_plane=cp, run_id="bench-build"
        )
        t_wh = time.perf_counter() - t1
        ours_s = t_land + t_wh
        landed = report.landed
        assert landed == args.resources, (landed, args.resources, report.as_metadata())
        assert built.table_counts.get("resources") == args.resources, built.table_counts
        ours_rss = peak_rss_mib()

        res = subprocess.run(
            [sys.executable, __file__, "--baseline", str(work / "src")],
            check=True,
            capture_output=True,
            text=True,
        )
        base_md = json.loads(res.stdout.strip().splitlines()[-1])
        assert base_md["rows"] == args.resources, base_md

        print(
            f"export: {report.files} files, {report.bytes_downloaded / 1e6:,.0f} MB on the "
            f"wire, gzip={args.gzip}, parallel={args.parallel}, quarantined "
            f"{report.quarantined}, mismatches {report.count_mismatches or 'none'}"
        )
        print(f"ours: download+land {t_land:.1f} s, warehouse base tables {t_wh:.1f} s")
        print(
            f"ours (export->lake->warehouse): {landed / ours_s:10,.0f} resources/s "
            f"{mb / ours_s:8.1f} MB/s  ({ours_s:.1f} s)"
        )
        print(
            f"DuckDB read_json, same files  : {base_md['rows'] / base_md['seconds']:10,.0f} "
            f"resources/s {mb / base_md['seconds']:8.1f} MB/s  ({base_md['seconds']:.1f} s)"
        )
        print(f"ratio ours/read_json: {base_md['seconds'] / ours_s:.2f} (target >= 0.5)")
        print(
            f"peak RSS: ours {ours_rss:,.0f} MiB (after landing {rss_land:,.0f}; "
            "target <= 1024), "
            f"read_json {base_md['rss_mib']:,.0f} MiB"
        )
        if not args.skip_validation_baseline:
            validation_cost(cp, settings)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

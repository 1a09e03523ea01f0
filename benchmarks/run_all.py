"""Run every benchmark, one after another, at a quick size (default) or the sizes the issues ask for.

    .venv/bin/python benchmarks/run_all.py            # quick: minutes, for a sanity check
    .venv/bin/python benchmarks/run_all.py --full     # the issue sizes (1M resources...): tens of minutes
    .venv/bin/python benchmarks/run_all.py --only views bulk_ingest

Each benchmark prints its own ratios against a baseline measured in the same run and its peak memory;
this runner only sequences them (never in parallel: they measure a 2-core machine) and keeps the output
under benchmarks/results/ (gitignored).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# name -> (quick arguments, full arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "generator": (["--resources", "200000"], ["--resources", "1000000"]),
    "views": (["--resources", "200000", "--sample", "500"], ["--resources", "1000000"]),
    "bulk_ingest": (["--resources", "200000"], ["--resources", "1000000"]),
    "bulk_download": (["--resources", "200000"], ["--resources", "1000000"]),
    "bulk_download_race": (["--resources", "38483", "--rounds", "1"], ["--resources", "38483"]),
    "patient_access": (["--connections", "40"], ["--connections", "1000"]),
    "ccda": (["--size", "100"], ["--size", "500"]),
    "identity": (["--patients", "20000"], ["--patients", "100000"]),
    "cds": (["--persons", "10000"], ["--persons", "100000"]),
    "ops": ([], []),
    "object_store": (["--resources", "200000"], ["--resources", "1000000"]),
    "compaction": (["--pulls", "500"], ["--pulls", "2000"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run at the sizes the issues ask for")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = ap.parse_args()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed: list[str] = []
    for name, (quick, full) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            print(f"== {name}: not present, skipped")
            continue
        cmd = [sys.executable, str(script), *(full if args.full else quick)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - started
        log = out_dir / f"{name}.txt"
        log.write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
        print(proc.stdout.rstrip())
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
        print(f"-- {name}: {status} in {took:.1f}s\n", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

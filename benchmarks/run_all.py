"""Run every benchmark, one after another, at a quick size (default) or the sizes the issues ask for.

    .venv/bin/python benchmarks/run_all.py            # quick: minutes, for a sanity check
    .venv/bin/python benchmarks/run_all.py --full     # the issue sizes (1M resources...): tens of minutes
    .venv/bin/python benchmarks/run_all.py --only views bulk_ingest
    .venv/bin/python benchmarks/run_all.py --quick --json results.json   # one object per benchmark

Each benchmark prints its own ratios against a baseline measured in the same run and its peak memory;
this runner only sequences them (never in parallel: they measure a 2-core machine) and keeps the output
under benchmarks/results/ (gitignored).

``--json FILE`` writes ``{"<name>": {"value", "baseline", "ratio", "target", "met", "peak_rss_mib",
...}}`` for every benchmark run (and ``{"met": false, "error": "not present"}`` for one whose script
does not exist). A script taking ``--json-out PATH`` writes its own object; for the others the
result is read from their printed report (:data:`PARSERS`).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

# name -> (quick arguments, full arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "generator": (["--resources", "200000"], ["--resources", "1000000"]),
    "views": (["--resources", "200000", "--sample", "500"], ["--resources", "1000000"]),
    # full: the growth table 100k -> 1M (10M: `--sizes 100000 1000000 10000000`, about 13 GB of NDJSON)
    "bulk_ingest": (["--resources", "200000"], ["--sizes", "100000", "1000000"]),
    "bulk_download": (["--resources", "200000"], ["--resources", "1000000"]),
    "bulk_download_race": (["--resources", "38483", "--rounds", "1"], ["--resources", "38483"]),
    "patient_access": (["--connections", "40"], ["--connections", "1000"]),
    "ccda": (["--size", "100"], ["--size", "500"]),
    # FEBRL 1-3 and a generated population (20k quick, 1M full: issues 15 and 17), with the anchor
    "identity": (["--patients", "20000"], ["--patients", "1000000"]),
    "cds": (["--persons", "10000"], ["--persons", "100000"]),
    "cds_load": (
        ["--persons", "10000", "--seconds", "10", "--workers", "2"],
        ["--persons", "100000", "--seconds", "60", "--workers", "2"],
    ),
    "shared_rate_limit": (["--seconds", "10"], ["--seconds", "60", "--limit", "50"]),
    "ops": ([], []),
    "object_store": (["--resources", "200000"], ["--resources", "1000000"]),
    "compaction": (["--pulls", "500"], ["--pulls", "2000"]),
    "udap": ([], ["--registrations", "50", "--tokens", "200"]),
}


# Always in the --json report, run or not: the benchmarks the issues track.
TRACKED = ("bulk_ingest", "bulk_download_race", "cds_load", "shared_rate_limit", "identity")


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1).replace(",", "")) if m else None


def _parse_bulk_ingest(out: str) -> dict[str, Any]:
    ours = _num(r"ours \(export->lake->warehouse\):\s*([\d,.]+) resources/s", out)
    base = _num(r"DuckDB read_json, same files\s*:\s*([\d,.]+) resources/s", out)
    ratio = _num(r"ratio ours/read_json: ([\d.]+)", out)
    rss = _num(r"peak RSS: ours ([\d,.]+) MiB", out)
    met = ratio is not None and ratio >= 0.5 and rss is not None and rss <= 1024
    return {
        "value": ours,
        "unit": "resources/s export->lake->warehouse",
        "baseline": base,
        "ratio": ratio,
        "target": "ratio >= 0.5 of DuckDB read_json, peak RSS <= 1024 MiB",
        "met": met,
        "peak_rss_mib": rss,
    }


#: Readers of the printed report of benchmarks without ``--json-out``.
PARSERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "bulk_ingest": _parse_bulk_ingest,
}


def _result(name: str, script: Path, out: str, json_path: Path, code: int) -> dict[str, Any]:
    """The benchmark's machine-readable result (``--json-out`` file, ``RESULT`` line or parser)."""
    result: dict[str, Any] | None = None
    if json_path.exists():
        result = json.loads(json_path.read_text())
        if isinstance(result, dict) and set(result) == {name}:
            result = result[name]  # written as {"<name>": {...}}: one level, like the others
    else:
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT {")]
        if lines:
            result = json.loads(lines[-1][len("RESULT ") :])
        elif name in PARSERS:
            result = PARSERS[name](out)
    if result is None:
        result = {"met": None, "error": "no machine-readable result"}
    if code != 0:
        result = {**result, "met": False, "error": f"exit {code}"}
    for key in ("value", "baseline", "ratio", "target", "met", "peak_rss_mib"):
        result.setdefault(key, None)
    return result


def _takes_json_out(script: Path) -> bool:
    return "--json-out" in script.read_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="run at the sizes the issues ask for")
    size.add_argument("--quick", action="store_true", help="quick sizes (the default)")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    ap.add_argument("--json", metavar="FILE", help="write one result object per benchmark")
    args = ap.parse_args()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-json-"))
    results: dict[str, Any] = {}
    failed: list[str] = []
    for name, (quick, full) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            print(f"== {name}: not present, skipped")
            results[name] = {"met": False, "error": "not present"}
            continue
        json_path = tmp / f"{name}.json"
        extra = ["--json-out", str(json_path)] if _takes_json_out(script) else []
        cmd = [sys.executable, str(script), *(full if args.full else quick), *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        # The repo root on the path: several benchmarks build their data with the tests' support
        # package (medblocks_pipelines_tests is not installed, it is not part of the product).
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])
            ),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        took = time.perf_counter() - started
        log = out_dir / f"{name}.txt"
        log.write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
        print(proc.stdout.rstrip())
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
        print(f"-- {name}: {status} in {took:.1f}s\n", flush=True)
        results[name] = {**_result(name, script, proc.stdout, json_path, proc.returncode)}
        results[name]["seconds"] = round(took, 1)
        if proc.returncode != 0:
            failed.append(name)
    if args.json:
        for name in TRACKED:
            if not (HERE / f"bench_{name}.py").exists():
                results.setdefault(name, {"met": False, "error": "not present"})
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results: {args.json}")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

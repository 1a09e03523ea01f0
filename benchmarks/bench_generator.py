"""Benchmark the synthetic population generator's scale path (stream_bulk_ndjson).

Usage:
    .venv/bin/python benchmarks/bench_generator.py [--resources 1000000] [--files-per-type 1]

Each measurement runs in its own child process so its peak RSS (ru_maxrss) is its own:
  * generator: stream_bulk_ndjson(resources=N): realistic, varied resources (fresh ids, shifted dates,
    jittered values, new names per patient copy), written to NDJSON files per type;
  * baseline: json.dumps of one fixed generated lab Observation, written N times to one file with the
    same buffering: the cost of serialising and writing alone, with no variation;
  * generator at N/10, to show that peak memory does not grow with N (bounded memory);
  * the rich path for reference: generate_population() + write_ndjson() for a few hundred persons.
Prints resources/s, MB/s, peak RSS and the generator/baseline throughput ratio.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_generator(n: int, out: Path, files_per_type: int, seed: int, sample: int) -> dict:
    from medblocks_sandbox.generator import stream_bulk_ndjson

    t0 = time.perf_counter()
    stats = stream_bulk_ndjson(
        out, resources=n, seed=seed, files_per_type=files_per_type, sample_persons=sample
    )
    seconds = time.perf_counter() - t0
    return {
        "resources": stats["resources"],
        "bytes": stats["bytes"],
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "types": len(stats["by_type"]),
    }


def _child_baseline(n: int, out: Path, seed: int) -> dict:
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    pop = generate_population(PopulationSpec(seed=seed, persons=2))
    template = next(
        r for r in pop.resources_for("mercy-general", "Observation") if "referenceRange" in r
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = 0
    buf: list[str] = []
    size = 0
    with (out / "Observation.ndjson").open("w", encoding="utf-8") as f:
        for _ in range(n):
            line = json.dumps(template, separators=(",", ":"), ensure_ascii=False) + "\n"
            buf.append(line)
            size += len(line)
            if size >= 1 << 20:
                f.write("".join(buf))
                written += size
                buf.clear()
                size = 0
        f.write("".join(buf))
        written += size
    seconds = time.perf_counter() - t0
    return {"resources": n, "bytes": written, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _child_rich(persons: int, out: Path, seed: int) -> dict:
    from medblocks_sandbox.generator import (
        PopulationSpec,
        generate_population,
        write_ndjson,
    )

    t0 = time.perf_counter()
    pop = generate_population(PopulationSpec(seed=seed, persons=persons))
    t1 = time.perf_counter()
    result = write_ndjson(pop, out)
    t2 = time.perf_counter()
    size = sum(Path(p).stat().st_size for p in result["files"])
    return {
        "resources": pop.resource_count,
        "bytes": size,
        "seconds": t2 - t0,
        "generate_seconds": t1 - t0,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _run_child(kind: str, n: int, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--resources",
        str(n),
        "--out",
        str(out),
        "--files-per-type",
        str(args.files_per_type),
        "--seed",
        str(args.seed),
        "--sample-persons",
        str(args.sample_persons),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _line(name: str, r: dict) -> str:
    rate = r["resources"] / r["seconds"] if r["seconds"] else float("inf")
    mbs = r["bytes"] / 1e6 / r["seconds"] if r["seconds"] else float("inf")
    return (
        f"{name:<26} {r['resources']:>10,} res  {r['seconds']:>7.2f} s  {rate:>11,.0f} res/s  "
        f"{mbs:>7.1f} MB/s  {r['bytes'] / 1e6:>8.1f} MB  peak RSS {r['peak_rss_mb']:>6.1f} MB"
    )


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", "--size", type=int, default=1_000_000)
    ap.add_argument("--files-per-type", type=int, default=1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rich-persons", type=int, default=300)
    ap.add_argument("--sample-persons", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="keep output here (default: temp)")
    ap.add_argument("--child", choices=("generator", "baseline", "rich"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        if args.child == "generator":
            r = _child_generator(
                args.resources, args.out, args.files_per_type, args.seed, args.sample_persons
            )
        elif args.child == "baseline":
            r = _child_baseline(args.resources, args.out, args.seed)
        else:
            r = _child_rich(args.resources, args.out, args.seed)
        print(json.dumps(r))
        return

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_generator_"))
    n = args.resources
    # the same sample (shapes) for N and N/10, so the RSS comparison isolates N
    args.sample_persons = 16 if n <= 200_000 else 48
    try:
        small = _run_child("generator", max(1, n // 10), root / "gen_small", args)
        shutil.rmtree(root / "gen_small", ignore_errors=True)
        gen = _run_child("generator", n, root / "gen", args)
        if args.out is None:
            shutil.rmtree(root / "gen", ignore_errors=True)
        base = _run_child("baseline", n, root / "baseline", args)
        shutil.rmtree(root / "baseline", ignore_errors=True)
        rich = _run_child("rich", args.rich_persons, root / "rich", args)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"generator benchmark: {n:,} resources, seed {args.seed}, "
        f"{args.files_per_type} file(s) per type"
    )
    print(_line("stream_bulk_ndjson", gen))
    print(_line("stream_bulk_ndjson (N/10)", small))
    print(_line("baseline json.dumps", base))
    print(_line(f"rich path ({args.rich_persons} persons)", rich))
    ratio = (gen["resources"] / gen["seconds"]) / (base["resources"] / base["seconds"])
    print(f"throughput ratio generator / baseline: {ratio:.2f}x")
    print(f"peak RSS growth from N/10 to N: {gen['peak_rss_mb'] - small['peak_rss_mb']:+.1f} MB")


if __name__ == "__main__":
    main()

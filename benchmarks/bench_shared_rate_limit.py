"""One source, two pulling processes: achieved request rate / the source's limit, and 429s.

    .venv/bin/python benchmarks/bench_shared_rate_limit.py [--limit 20] [--window 1] [--seconds 15]
        [--processes 2] [--threads 3] [--json-out FILE]

The sandbox EHR (in this process) enforces ``--limit`` requests per ``--window`` seconds on its FHIR
endpoint with its ``rate_limit`` fault (a sliding window; above it a 429 with Retry-After) and
counts what it accepted and refused. ``--processes`` separate processes each run ``--threads``
threads of our ``FhirClient`` sending reads as fast as their limiter lets them, for ``--seconds``.

Baseline (same run): each process with its own in-process ``RateLimiter`` (no
``MEDBLOCKS_REDIS_URL``): together they send ``processes`` times the limit and collect 429s.
Measured: the shared limiter (``limiter_for`` with Redis): one schedule for every process. The
value is accepted requests per window / limit over the run (target >= 0.9) with zero 429s. The
last line is machine-readable (``RESULT {...}``); ``--json-out`` writes it.
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import secrets
import threading
import time
from pathlib import Path
from typing import Any


def _puller(args: dict[str, Any], ready: Any, go: Any, out: Any) -> None:
    """One process: ``threads`` threads reading ``metadata`` through one source limiter."""
    import httpx

    from medblocks_pipelines.lib.errors import TransientError
    from medblocks_pipelines.lib.fhir.client import FhirClient, FhirRequestError, limiter_for

    limiter = limiter_for(args["key"], args["limit"], args["window"], redis_url=args["redis_url"])
    http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=args["threads"] + 2))
    stop_at: list[float] = []
    counts = {"sent": 0, "http_429": 0, "errors": 0}
    lock = threading.Lock()

    def work() -> None:
        client = FhirClient(args["base"], http=http, limiter=limiter, max_retries=0)
        while time.time() < stop_at[0]:
            try:
                client.request("GET", "metadata")
            except (FhirRequestError, TransientError) as exc:
                with lock:
                    if getattr(exc, "status", None) == 429 or "429" in str(exc):
                        counts["http_429"] += 1
                    else:
                        counts["errors"] += 1
            with lock:
                counts["sent"] += 1

    ready.put(os.getpid())
    start = go.get()
    stop_at.append(start + args["seconds"])
    time.sleep(max(0.0, start - time.time()))
    threads = [threading.Thread(target=work) for _ in range(args["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    http.close()
    out.put({**counts, "limiter": type(limiter).__name__})


def _phase(base: str, faults: Any, opts: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    rule = faults.add("rate_limit", limit=opts.limit, window=opts.window, path="/fhir/")
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    key = f"bench-{secrets.token_hex(4)}"
    args = {
        "base": base,
        "key": key,
        "limit": opts.limit,
        "window": opts.window,
        "seconds": opts.seconds,
        "threads": opts.threads,
        "redis_url": redis_url,
    }
    procs = [
        ctx.Process(target=_puller, args=(args, ready, go, out)) for _ in range(opts.processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start = time.time() + 0.5
    for _ in procs:
        go.put(start)
    reports = [out.get(timeout=300 + opts.seconds) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    stats = faults.rate_stats(rule)
    faults.clear()
    span = max(stats["last"] - stats["first"], 1e-9)
    usage = (stats["accepted"] - 1) / (span / opts.window * opts.limit)
    return {
        "limiter": sorted({r["limiter"] for r in reports}),
        "sent": sum(r["sent"] for r in reports),
        "accepted": stats["accepted"],
        "refused_429": stats["refused"],
        "peak_in_window": stats["peak"],
        "usage": round(usage, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument(
        "--redis-url", default=os.environ.get("MEDBLOCKS_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    ap.add_argument("--json-out")
    opts = ap.parse_args()

    from medblocks_sandbox.run import start_sandbox

    handle = start_sandbox(base_port=0, persons=4, seed=1, roles=["ehr"])
    try:
        org = handle.orgs_of("ehr")[0]
        faults = handle.org_handles(org.org_id)["faults"]
        print(
            f"source limit {opts.limit} per {opts.window:g} s; {opts.processes} processes x "
            f"{opts.threads} threads for {opts.seconds:g} s each phase",
            flush=True,
        )
        baseline = _phase(org.fhir_base, faults, opts, "")
        shared = _phase(org.fhir_base, faults, opts, opts.redis_url)
    finally:
        handle.stop()
    print(f"{'limiter':<34}{'sent':>7}{'accepted':>10}{'429':>6}{'peak/window':>13}{'usage':>8}")
    for name, m in (("per process (baseline)", baseline), ("shared through Redis", shared)):
        print(
            f"{name:<34}{m['sent']:>7}{m['accepted']:>10}{m['refused_429']:>6}"
            f"{m['peak_in_window']:>13}{m['usage']:>8.3f}"
        )
    met = (
        shared["usage"] >= 0.9
        and shared["refused_429"] == 0
        and shared["peak_in_window"] <= opts.limit
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "value": shared["usage"],
        "unit": "accepted rate / source limit, 2 processes, shared limiter",
        "baseline": baseline["usage"],
        "ratio": round(shared["usage"] / baseline["usage"], 3) if baseline["usage"] else None,
        "target": ">= 0.9 of the limit with zero 429s",
        "met": met,
        "peak_rss_mib": round(rss, 1),
        "http_429": shared["refused_429"],
        "baseline_http_429": baseline["refused_429"],
        "shared": shared,
        "per_process": baseline,
    }
    print(
        f"shared: {shared['usage']:.1%} of the limit, {shared['refused_429']} x 429; per-process "
        f"limiters: {baseline['refused_429']} x 429; target {'met' if met else 'NOT met'}; "
        f"peak RSS {rss:.0f} MiB"
    )
    print("RESULT " + json.dumps(result))
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

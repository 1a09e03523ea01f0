"""Benchmark: pull N active patient-access connections from a rate-limited, slow sandbox EHR.

    .venv/bin/python benchmarks/bench_patient_access.py [--connections 1000] [--limit 20]
        [--latency 0.05] [--persons 120] [--concurrency 4]

Setup (not timed in the pull figure): the sandbox EHR runs in a child process (so its memory is not
ours); every connection is made through the sandbox's real login and consent pages via our web app.
Then the sandbox answers every FHIR request after ``--latency`` seconds and refuses (429) more than
``--limit`` requests per second per client, and we pull all connections in one batch.

The baseline computed in the same run is the rate-limit bound: requests made / limit per second,
the least time any client could take for those requests. Reported: total pull time beside that
bound, the share of the limit used (target >= 90 %), 429 answers (target 0: never breached), and
peak memory (RSS of this process, and tracemalloc peak of the pull). Connections cycle over the
population's portal logins when N exceeds them (each connection is still its own consent and grant).
"""

import argparse
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from typing import Any

import httpx


def _sandbox_child(conn: Any, persons: int, seed: int) -> None:
    from medblocks_sandbox.run import start_sandbox

    handle = start_sandbox(base_port=0, persons=persons, seed=seed, roles=["ehr"])
    org = handle.orgs_of("ehr")[0]
    conn.send(
        {
            "secret": handle.admin_secret,
            "org_id": org.org_id,
            "name": org.name,
            "base_url": org.base_url,
        }
    )
    conn.recv()  # wait for "stop"
    handle.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=20, help="requests per second per client")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--persons", type=int, default=120)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--data-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()

    import os
    import tempfile

    from cryptography.fernet import Fernet

    tmp = tempfile.TemporaryDirectory(prefix="bench-pa-")
    os.environ["MEDBLOCKS_DATA_DIR"] = args.data_dir or tmp.name
    os.environ.setdefault("MEDBLOCKS_SECRET_KEY", Fernet.generate_key().decode())
    for var in ("MEDBLOCKS_DATABASE_URL", "MEDBLOCKS_LAKE_ROOT", "MEDBLOCKS_WAREHOUSE_DIR"):
        os.environ.pop(var, None)

    from medblocks_pipelines.lib.fhir.pull_batch import pull_batch
    from medblocks_pipelines.lib.registry import open_control_plane
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.smart.launch import create_connect_link
    from medblocks_pipelines.web.app import create_app
    from medblocks_sandbox.consent_browser import connect_via_consent_page
    from medblocks_sandbox.generator import PopulationSpec, generate_population
    from medblocks_sandbox.run import serve

    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=_sandbox_child, args=(child, args.persons, args.seed), daemon=True
    )
    proc.start()
    info = parent.recv()
    base_url = info["base_url"]
    fhir_base = f"{base_url}/fhir"
    logins = [
        lg
        for lg in generate_population(PopulationSpec(seed=args.seed, persons=args.persons)).logins
        if lg.org_id == info["org_id"]
    ]
    settings = get_settings()
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    cp.add_tenant("bench", "Bench tenant")
    client_id = "bench-app"
    admin = {"X-Admin-Secret": info["secret"]}
    faults_url = f"{base_url}/_sandbox/faults"
    fault_hdr = {"X-Sandbox-Admin": info["secret"]}
    try:
        with (
            httpx.Client(timeout=60.0) as http,
            serve(lambda base: create_app(public_base_url=base, settings=settings)) as web,
        ):
            http.post(
                f"{base_url}/_admin/clients",
                headers=admin,
                json={
                    "client_id": client_id,
                    "token_endpoint_auth_method": "none",
                    "redirect_uris": [f"{web}/connect/callback"],
                    "name": "Bench",
                },
            ).raise_for_status()
            cp.add_source(
                "bench-ehr",
                info["name"],
                "sandbox",
                "ehr",
                fhir_base,
                ["patient_access"],
                config={
                    "client_id": client_id,
                    "rate_limit": {"requests": args.limit, "per_seconds": 1.0},
                    "concurrency": args.concurrency,
                    "observation_categories_combined": True,
                },
            )
            t0 = time.perf_counter()
            ids = []
            for i in range(args.connections):
                login = logins[i % len(logins)]
                link = create_connect_link(
                    cp,
                    tenant_id="bench",
                    source_id="bench-ehr",
                    patient_ref=f"b{i}",
                    public_base_url=web,
                    return_url="https://bench.example/done",
                )
                out = connect_via_consent_page(
                    link.url,
                    username=login.username,
                    password=login.password,
                    stop_at="https://bench.example/done",
                    http=http,
                )
                if out.status != "active":
                    print(f"connection {i} failed: {out.reason}", file=sys.stderr)
                    return 1
                ids.append(link.connection_id)
            consent_s = time.perf_counter() - t0
            print(f"connected {len(ids)} patients through the consent page in {consent_s:.1f} s")

            # The slow, rate-limited EHR (FHIR paths only; the discovery GET is anonymous).
            http.post(
                faults_url,
                headers=fault_hdr,
                json=[
                    {"kind": "latency", "path": "/fhir/", "seconds": args.latency},
                    {
                        "kind": "rate_limit",
                        "client_id": client_id,
                        "path": "/fhir/",
                        "limit": args.limit,
                        "window": 1.0,
                    },
                ],
            ).raise_for_status()

            tracemalloc.start()
            t1 = time.perf_counter()
            batch = pull_batch(
                cp, ids, lake_root=settings.lake_root, run_id="bench", concurrency=args.concurrency
            )
            pull_s = time.perf_counter() - t1
            _cur, peak_traced = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    finally:
        parent.send("stop")
        proc.join(timeout=10)

    meta = batch.as_metadata()
    bound_s = batch.requests / args.limit
    used = bound_s / pull_s if pull_s else 0.0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"pulled {meta['connections_pulled']} connections: {meta['by_status']}, "
        f"{meta['resources']:,} resources, {meta['quarantined']} quarantined"
    )
    print(
        f"requests: {batch.requests:,}  (429 answers: {meta['http_429']}, "
        f"failures: {meta['failures_by_reason'] or 'none'})"
    )
    print(f"pull time:              {pull_s:8.1f} s")
    print(
        f"rate-limit bound:       {bound_s:8.1f} s   ({batch.requests} requests / "
        f"{args.limit} per s, latency {args.latency * 1000:.0f} ms)"
    )
    print(f"ratio bound/actual:     {used:8.3f}   (share of the rate limit used; target >= 0.90)")
    print(f"throughput:             {batch.requests / pull_s:8.2f} requests/s")
    print(f"breached the limit:     {'YES' if meta['http_429'] else 'no'}")
    print(
        f"peak RSS:               {rss_mb:8.1f} MB   (tracemalloc peak of the pull "
        f"{peak_traced / 2**20:.1f} MB)"
    )
    ok = meta["http_429"] == 0 and used >= 0.90 and meta["by_status"].get("success") == len(ids)
    tmp.cleanup()
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())

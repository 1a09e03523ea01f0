"""CDS Hooks latency under load: patient-view over a warehouse of N persons vs. discovery.

    .venv/bin/python benchmarks/bench_cds.py [--persons 100000] [--rate 100] [--seconds 20]

Our web app (``create_app``: uvicorn, one worker) serves in this process; the load comes from a
second process (httpx AsyncClient, open loop at ``--rate`` requests/s: latency is measured from each
request's *scheduled* send time, so a stalled server cannot hide queueing). Every request carries
its own ES384 JWT (pre-signed before the clock starts, unique jti), so the full security path runs:
signature, aud, exp/iat, jti insert. Patients are drawn at random from the N persons. The same load
on ``GET /cds-services`` (the floor of the web stack with the same JWT checks) is the baseline;
then a closed-loop burst (8 in flight) gives the saturation throughput of each endpoint.
"""

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ISS = "https://bench-ehr.example"


def _sign_all(key_json: str, aud: str, n: int) -> list[str]:
    import jwt

    from medblocks_pipelines.lib.smart.assertion import SigningKey

    key = SigningKey.from_json(key_json)
    now = int(time.time())
    return [
        jwt.encode(
            {"iss": ISS, "aud": aud, "iat": now, "exp": now + 900, "jti": str(uuid.uuid4())},
            key.private_pem,
            algorithm=key.alg,
            headers={"kid": key.kid, "typ": "JWT"},
        )
        for _ in range(n)
    ]


def _load(args: dict[str, Any], out: Any) -> None:
    """Child process: pre-sign, then send at a fixed rate (or closed loop) and report latencies."""
    import httpx

    n = args["n"]
    tokens = _sign_all(args["key"], args["url"], n)
    rng = random.Random(7)
    bodies = []
    for _ in range(n):
        pid = f"a{rng.randrange(args['persons'])}"
        bodies.append(
            {
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "context": {"userId": "Practitioner/bench", "patientId": pid},
                "prefetch": {"patient": None},
            }
        )

    async def run() -> tuple[list[float], int, float]:
        lat: list[float] = []
        errors = 0
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:

            async def one(i: int, scheduled: float) -> None:
                nonlocal errors
                headers = {"Authorization": f"Bearer {tokens[i]}"}
                if args["method"] == "GET":
                    r = await client.get(args["url"], headers=headers)
                else:
                    r = await client.post(args["url"], json=bodies[i], headers=headers)
                if r.status_code != 200:
                    errors += 1
                lat.append(time.perf_counter() - scheduled)

            start = time.perf_counter()
            if args["closed"]:
                counter = iter(range(n))

                async def worker() -> None:
                    for i in counter:
                        await one(i, time.perf_counter())

                await asyncio.gather(*(worker() for _ in range(args["closed"])))
            else:
                tasks = []
                for i in range(n):
                    scheduled = start + i / args["rate"]
                    delay = scheduled - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(i, scheduled)))
                await asyncio.gather(*tasks)
            return lat, errors, time.perf_counter() - start

    lat, errors, elapsed = asyncio.run(run())
    out.put({"lat": lat, "errors": errors, "elapsed": elapsed})


def _measure(
    url: str, method: str, key_json: str, *, persons: int, n: int, rate: float, closed: int = 0
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(
        target=_load,
        args=(
            {
                "url": url,
                "method": method,
                "key": key_json,
                "persons": persons,
                "n": n,
                "rate": rate,
                "closed": closed,
            },
            q,
        ),
    )
    p.start()
    res = q.get(timeout=600)
    p.join(timeout=30)
    lat = sorted(res["lat"])

    def pct(x: float) -> float:
        return lat[min(len(lat) - 1, int(x * len(lat)))] * 1000

    return {
        "n": len(lat),
        "errors": res["errors"],
        "rps": len(lat) / res["elapsed"],
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": lat[-1] * 1000,
        "mean": statistics.fmean(lat) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", "--size", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=2000, help="requests in the closed-loop burst")
    opts = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-cds-"))
    os.environ["MEDBLOCKS_DATA_DIR"] = str(tmp / "data")
    os.environ.setdefault("MEDBLOCKS_SECRET_KEY", "")
    if not os.environ["MEDBLOCKS_SECRET_KEY"]:
        from cryptography.fernet import Fernet

        os.environ["MEDBLOCKS_SECRET_KEY"] = Fernet.generate_key().decode()
    for var in ("MEDBLOCKS_DATABASE_URL", "MEDBLOCKS_LAKE_ROOT", "MEDBLOCKS_WAREHOUSE_DIR"):
        os.environ.pop(var, None)

    from medblocks_pipelines.lib.registry import open_control_plane
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.smart.assertion import generate_signing_key
    from medblocks_pipelines.lib.warehouse.build import warehouse_path
    from medblocks_pipelines.web.app import create_app
    from medblocks_pipelines_tests.support.cds_synthetic import write_synthetic_warehouse
    from medblocks_sandbox.run import serve

    settings = get_settings()
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    key = generate_signing_key("ES384", kid="bench")
    cp.add_tenant("bench", "Bench")
    for sid, kind in (("ehr-a", "ehr"), ("ehr-b", "ehr"), ("payer-x", "payer")):
        cp.add_source(
            sid,
            sid,
            "sandbox",
            kind,
            f"http://{sid}.example/fhir",
            ["clinician_workflow", "backend"],
        )
    cp.add_organization(
        "ehr-a",
        "bench",
        "ehr-a",
        "EHR A",
        config={"cds": {"iss": ISS, "jwks": {"keys": [key.public_jwk()]}}},
    )

    t = time.perf_counter()
    path = warehouse_path(settings, "bench")
    # Written in a child process, so the server's RSS is the index's, not DuckDB's write buffers.
    writer = mp.get_context("spawn").Process(
        target=write_synthetic_warehouse, args=(path,), kwargs={"persons": opts.persons}
    )
    writer.start()
    writer.join()
    write_s = time.perf_counter() - t
    print(
        f"warehouse: {opts.persons:,} persons, {path.stat().st_size / 1e6:.1f} MB, "
        f"written in {write_s:.1f} s"
    )

    n = int(opts.rate * opts.seconds)
    with serve(lambda base: create_app(public_base_url=base, settings=settings)) as web:
        import httpx

        from medblocks_pipelines.lib.cds import service as svc_mod  # noqa: F401

        pv_url = f"{web}/cds-services/medblocks-patient-view"
        disc_url = f"{web}/cds-services"
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Warm-up: the first call loads the index (synchronously: nothing to serve before it).
        warm = _sign_all(key.to_json(), pv_url, 1)[0]
        t = time.perf_counter()
        r = httpx.post(
            pv_url,
            json={
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "context": {"userId": "Practitioner/b", "patientId": "a0"},
                "prefetch": {"patient": None},
            },
            headers={"Authorization": f"Bearer {warm}"},
            timeout=600,
        )
        load_s = time.perf_counter() - t
        assert r.status_code == 200 and r.json()["cards"], r.text[:300]
        print(f"index load (first call): {load_s:.1f} s; sample cards: {len(r.json()['cards'])}")
        rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        print(f"\nopen loop, {opts.rate:g} req/s for {opts.seconds:g} s, from a second process:")
        disc = _measure(disc_url, "GET", key.to_json(), persons=opts.persons, n=n, rate=opts.rate)
        pv = _measure(pv_url, "POST", key.to_json(), persons=opts.persons, n=n, rate=opts.rate)
        head = f"{'endpoint':<22}{'n':>6}{'err':>5}{'req/s':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
        print(head)
        for name, m in (("discovery (floor)", disc), ("patient-view", pv)):
            print(
                f"{name:<22}{m['n']:>6}{m['errors']:>5}{m['rps']:>8.1f}{m['p50']:>8.1f}"
                f"{m['p90']:>8.1f}{m['p99']:>8.1f}{m['max']:>8.1f}"
            )
        print(
            f"patient-view / discovery: p50 x{pv['p50'] / disc['p50']:.2f}, "
            f"p99 x{pv['p99'] / disc['p99']:.2f}; target p99 <= 50 ms: "
            f"{'met' if pv['p99'] <= 50 else 'NOT met'}"
        )

        print(f"\nclosed loop, 8 in flight, {opts.burst} requests (saturation throughput):")
        dsat = _measure(
            disc_url,
            "GET",
            key.to_json(),
            persons=opts.persons,
            n=opts.burst,
            rate=opts.rate,
            closed=8,
        )
        psat = _measure(
            pv_url,
            "POST",
            key.to_json(),
            persons=opts.persons,
            n=opts.burst,
            rate=opts.rate,
            closed=8,
        )
        for name, m in (("discovery (floor)", dsat), ("patient-view", psat)):
            print(
                f"{name:<22}{m['rps']:>8.1f} req/s  p50 {m['p50']:.1f} ms  p99 {m['p99']:.1f} ms"
                f"  errors {m['errors']}"
            )
        print(f"patient-view / discovery throughput: x{psat['rps'] / dsat['rps']:.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nserver peak RSS: {rss:.0f} MB (before the index {rss_before:.0f} MB, after loading it "
        f"{rss_after_load:.0f} MB); "
        f"cpus: {os.cpu_count()}; python {sys.version.split()[0]}"
    )
    cp.engine.dispose()


if __name__ == "__main__":
    main()

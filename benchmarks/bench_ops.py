"""Operations throughput: webhook deliveries/s and export MB/s, each beside a plain baseline.

    .venv/bin/python benchmarks/bench_ops.py [--events N] [--resources N]

Webhooks: N outbox events delivered by ``deliver_due`` (fan-out, claim, Standard Webhooks signing,
POST, attempt record, SQLite control plane) to a loopback Starlette receiver that verifies every
signature, beside the baseline of N plain unsigned POSTs of the same bodies with the same client.

Exports: a warehouse of N synthetic resources exported as gzip NDJSON and as Parquet to a folder
(delta computation, streaming, manifest), beside the baseline of copying a file of the same
uncompressed NDJSON bytes (``shutil.copyfile``). MB/s is measured on the uncompressed resource
bytes, so the ratios compare like with like. Prints peak RSS.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_webhooks(root: Path, events: int) -> None:
    import httpx
    from standardwebhooks.webhooks import Webhook
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from medblocks_pipelines.lib.ops import webhooks as wh
    from medblocks_pipelines.lib.registry import open_control_plane, utcnow
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_sandbox.run import ServerThread, bind_socket

    secret = wh.new_secret()
    verifier = Webhook(secret)
    got = {"verified": 0, "plain": 0}

    async def hook(request: Request) -> Response:
        body = await request.body()
        if "webhook-signature" in request.headers:
            verifier.verify(body, dict(request.headers))
            got["verified"] += 1
        else:
            got["plain"] += 1
        return Response(status_code=204)

    sock = bind_socket()
    host, port = sock.getsockname()[:2]
    server = ServerThread(sock, Starlette(routes=[Route("/h", hook, methods=["POST"])])).start()
    url = f"http://{host}:{port}/h"
    try:
        cp = open_control_plane(get_settings(root / "wh"))
        cp.add_tenant("acme", "Acme")
        wh.add_endpoint(cp, tenant_id="acme", url=url, secret=secret)
        for i in range(events):
            cp.emit_event("acme", "sync.completed", {"pull_id": i, "counts": {"Patient": i}})
        bodies = [wh.build_message(e) for e in cp.list_events(tenant_id="acme", limit=events)]
        with httpx.Client() as http:
            t0 = time.perf_counter()
            for body in bodies:
                http.post(url, content=body, headers={"content-type": "application/json"})
            plain_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sent = 0
            while sent < events:
                report = wh.deliver_due(
                    cp, now=utcnow(), http=http, policy=wh.DeliveryPolicy(batch=500)
                )
                sent += report.succeeded
                if report.attempted == 0:
                    break
            ours_s = time.perf_counter() - t0
    finally:
        server.stop()
    assert got["verified"] == events, got
    print(f"webhooks: {events} events")
    print(f"  plain POSTs      {events / plain_s:8.0f} req/s")
    print(f"  deliver_due      {events / ours_s:8.0f} deliveries/s (signed, verified, recorded)")
    print(f"  ratio ours/plain {plain_s / ours_s:8.2f}")


def bench_exports(root: Path, resources: int) -> None:
    from medblocks_pipelines.lib.ops import exports as ex
    from medblocks_pipelines.lib.registry import open_control_plane
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.warehouse.build import build_warehouse
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

    settings = get_settings(root / "ex")
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme")
    raw = root / "resources.ndjson"
    prov = Provenance("acme", "backend", "src", None, None, "bench")
    with LakeWriter(settings.lake_root, prov) as w, raw.open("w") as fh:
        for i in range(resources):
            if i % 3 == 0:
                r = {
                    "resourceType": "Patient",
                    "id": f"p{i}",
                    "name": [{"family": f"F{i}"}],
                    "birthDate": "1970-01-01",
                    "gender": "female",
                }
            else:
                r = {
                    "resourceType": "Observation",
                    "id": f"o{i}",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/p{i - i % 3}"},
                    "effectiveDateTime": "2026-01-01T10:00:00Z",
                    "valueQuantity": {"value": 72.5, "unit": "/min"},
                }
            line = json.dumps(r, separators=(",", ":"))
            w.add(line)
            fh.write(line + "\n")
    build_warehouse("acme", settings=settings, control_plane=cp, steps=[])
    mb = raw.stat().st_size / 1e6
    t0 = time.perf_counter()
    shutil.copyfile(raw, root / "copy.ndjson")
    copy_s = time.perf_counter() - t0
    print(f"exports: {resources} resources, {mb:.1f} MB of NDJSON")
    print(f"  plain file copy  {mb / copy_s:8.1f} MB/s")
    for kind in ("ndjson", "parquet"):
        ex.add_destination(cp, id=f"b-{kind}", tenant_id="acme", kind=kind, url=str(root / kind))
        t0 = time.perf_counter()
        res = ex.run_export(cp, settings, f"b-{kind}")
        took = time.perf_counter() - t0
        assert res.exported == resources
        label = "gzip NDJSON" if kind == "ndjson" else "Parquet"
        print(
            f"  export {label:<10}{mb / took:8.1f} MB/s  ({res.bytes / 1e6:.1f} MB written, "
            f"copy/export time ratio {copy_s / took:.3f})"
        )
        t0 = time.perf_counter()
        empty = ex.run_export(cp, settings, f"b-{kind}")
        print(f"  empty delta ({label}) {time.perf_counter() - t0:6.2f} s, {empty.exported} sent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--resources", type=int, default=20000)
    args = parser.parse_args()
    os.environ.setdefault("MEDBLOCKS_SECRET_KEY", "")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not os.environ["MEDBLOCKS_SECRET_KEY"]:
            from cryptography.fernet import Fernet

            os.environ["MEDBLOCKS_SECRET_KEY"] = Fernet.generate_key().decode()
        os.environ.pop("MEDBLOCKS_DATABASE_URL", None)
        os.environ["MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE"] = "1"  # the receiver is on loopback
        bench_webhooks(root, args.events)
        bench_exports(root, args.resources)
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

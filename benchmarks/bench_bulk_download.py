"""Bulk Data download throughput: our client beside a plain sequential httpx download, same run.

    .venv/bin/python benchmarks/bench_bulk_download.py [--resources N] [--parallel P] [--gzip]

Generates N resources as NDJSON (the sandbox generator's streaming path), serves them from a
sandbox EHR (SMART backend auth + Bulk Data, in a separate process so its memory and CPU are not
ours) on loopback, runs one system-level export, then downloads every manifest file twice:
(1) plain: one `httpx.stream` GET after another, bytes to disk; (2) ours: `BulkClient.download`
(token per request, redirect handling, retry/resume bookkeeping) with P parallel workers.
Prints files/s and MB/s for both, the ratio, and peak RSS of this process.

The helpers here (`start_server`, `prepare_registry`) are shared with bench_bulk_ingest.py.
"""

import argparse
import concurrent.futures as cf
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADMIN_SECRET = "bench-admin-secret"
CLIENT_ID = "bench-client"


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(out: Path, resources: int, files_per_type: int) -> dict[str, Any]:
    """Write ``resources`` generated FHIR resources as NDJSON under ``out``."""
    from medblocks_sandbox.generator.ndjson import stream_bulk_ndjson

    out.mkdir(parents=True, exist_ok=True)
    return stream_bulk_ndjson(out, resources=resources, seed=42, files_per_type=files_per_type)


def _serve(directory: str, port_file: str) -> None:
    """Child process: one sandbox EHR org whose bulk export serves ``directory`` as-is."""
    from medblocks_sandbox.bulk_source import NdjsonDirSource
    from medblocks_sandbox.ehr_common import OrgConfig
    from medblocks_sandbox.fhir_store import FhirStore
    from medblocks_sandbox.run import build_org_app, serve

    holder: dict[str, Any] = {}

    def factory(base: str) -> Any:
        app, handles = build_org_app(
            OrgConfig(org_id="bench", name="Bench"),
            FhirStore(),
            base_url=base,
            admin_secret=ADMIN_SECRET,
        )
        bulk = handles["bulk"]
        bulk.source = NdjsonDirSource(directory)  # unfiltered system export: files as they are
        # Ready at once unless the caller asks for a server that takes its time (start_server).
        bulk.config.export_seconds = float(os.environ.get("BENCH_EXPORT_SECONDS") or 0)
        bulk.config.retry_after = int(os.environ.get("BENCH_RETRY_AFTER") or 0)
        holder["base"] = base
        return app

    with serve(factory):
        Path(port_file + ".tmp").write_text(holder["base"])
        os.replace(port_file + ".tmp", port_file)
        while True:
            time.sleep(3600)


def start_server(
    directory: Path, work: Path, *, export_seconds: float = 0.0, retry_after: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the sandbox EHR in a child process; returns it and its base URL. Its exports are
    ready at once, or after ``export_seconds`` (polls answered 202 with ``retry_after``)."""
    port_file = work / "server.url"
    env = {
        **os.environ,
        "BENCH_EXPORT_SECONDS": str(export_seconds),
        "BENCH_RETRY_AFTER": str(retry_after),
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory), str(port_file)], env=env
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("bench server did not start")
        time.sleep(0.05)
    return proc, port_file.read_text()


def prepare_registry(base: str, data_dir: Path, *, parallel: int, gzip: bool) -> Any:
    """A control plane with our key, registered at the sandbox (inline JWKS), one organization."""
    import httpx

    from medblocks_pipelines.lib.registry import open_control_plane
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.smart.keys import KeyStore
    from medblocks_sandbox.ehr_common import ADMIN_HEADER

    os.environ["MEDBLOCKS_DATA_DIR"] = str(data_dir)
    os.environ.pop("MEDBLOCKS_DATABASE_URL", None)
    settings = get_settings(data_dir)
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    keys = KeyStore(cp.vault)
    keys.generate("ES384")
    resp = httpx.post(
        f"{base}/_admin/clients",
        headers={ADMIN_HEADER: ADMIN_SECRET},
        json={
            "client_id": CLIENT_ID,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": keys.jwks(),
            "scopes": ["system/*.rs"],
        },
    )
    resp.raise_for_status()
    cp.add_tenant("bench", "Bench")
    cp.add_source(
        "bench-ehr",
        "Bench EHR",
        "generic",
        "ehr",
        f"{base}/fhir",
        ["backend"],
        {"client_id": CLIENT_ID, "max_parallel_downloads": parallel, "accept_gzip": gzip},
    )
    cp.add_organization("bench-org", "bench", "bench-ehr", "Bench Org", {"level": "system"})
    return settings, cp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=1_000_000)
    parser.add_argument("--files-per-type", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--gzip", action="store_true", help="Ask for gzip (server compresses).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(*args.serve)
        return

    from medblocks_pipelines.lib.fhir.bulk import parse_manifest
    from medblocks_pipelines.lib.fhir.bulk_sync import (
        kickoff_export,
        make_client,
        make_http,
        org_config,
        wait_for_export,
    )

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-dl-"))
    proc = None
    try:
        t0 = time.perf_counter()
        gen = generate(work / "src", args.resources, args.files_per_type)
        print(
            f"generated {args.resources:,} resources in {time.perf_counter() - t0:.1f} s "
            f"({sum(p.stat().st_size for p in (work / 'src').glob('*.ndjson*')) / 1e6:,.0f} MB)"
        )
        del gen
        proc, base = start_server(work / "src", work)
        settings, cp = prepare_registry(base, work / "data", parallel=args.parallel, gzip=args.gzip)
        kicked = kickoff_export(cp, "bench", "bench-org", run_id="bench")
        row = wait_for_export(cp, kicked.export_id, min_wait=0.05, timeout=600)
        manifest = parse_manifest(row.manifest)
        urls = [i.url for i in manifest.items]
        cfg = org_config(cp, "bench", "bench-org")

        with make_http() as http:
            client = make_client(cp, cfg, http)
            token = client.auth.token() if client.auth else ""
            headers = {
                "Authorization": f"Bearer {token}",
                "Accept": "application/fhir+ndjson",
                "Accept-Encoding": "gzip" if args.gzip else "identity",
            }

            def plain() -> int:
                """(1) one GET after another, bytes to disk."""
                target = work / "plain"
                target.mkdir()
                total = 0
                for n, url in enumerate(urls):
                    with (
                        http.stream("GET", url, headers=headers) as resp,
                        open(target / f"{n}.ndjson", "wb") as fh,
                    ):
                        resp.raise_for_status()
                        for chunk in resp.iter_raw():
                            fh.write(chunk)
                            total += len(chunk)
                shutil.rmtree(target)
                return total

            def ours() -> int:
                """(2) BulkClient.download with the per-source parallel limit."""
                target = work / "ours"
                with cf.ThreadPoolExecutor(args.parallel) as pool:
                    results = list(
                        pool.map(
                            lambda nu: client.download(
                                nu[1],
                                target / f"{nu[0]}.ndjson",
                                requires_token=manifest.requires_access_token,
                            ),
                            enumerate(urls),
                        )
                    )
                shutil.rmtree(target)
                return sum(r.bytes for r in results)

            # Alternate the two, best of `rounds`, so neither gets the warm page cache alone.
            timings: dict[str, float] = {"plain": float("inf"), "ours": float("inf")}
            sizes: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, fn in (("plain", plain), ("ours", ours)):
                    t0 = time.perf_counter()
                    sizes[name] = fn()
                    timings[name] = min(timings[name], time.perf_counter() - t0)
            plain_s, ours_s = timings["plain"], timings["ours"]
            plain_bytes, ours_bytes = sizes["plain"], sizes["ours"]
            client.delete(row.polling_url)
        assert ours_bytes == plain_bytes, (ours_bytes, plain_bytes)
        mb = plain_bytes / 1e6
        print(f"files: {len(urls)}, {mb:,.1f} MB, gzip={args.gzip}, parallel={args.parallel}")
        print(
            f"plain sequential httpx : {len(urls) / plain_s:8.1f} files/s  "
            f"{mb / plain_s:8.1f} MB/s  ({plain_s:.2f} s)"
        )
        print(
            f"BulkClient.download    : {len(urls) / ours_s:8.1f} files/s  "
            f"{mb / ours_s:8.1f} MB/s  ({ours_s:.2f} s)"
        )
        print(f"ratio ours/plain (MB/s): {plain_s / ours_s:.2f}")
        print(f"peak RSS (client process): {peak_rss_mib():.0f} MiB")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

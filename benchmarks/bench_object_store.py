"""The lake and the warehouse in object storage versus on local disk, same records, same run.

    .venv/bin/python benchmarks/bench_object_store.py [--resources N]

An S3-compatible server (moto in server mode, its own process on loopback) stands in for the store.
N synthetic resources, as one NDJSON file per type, are landed three ways and the tenant's base
warehouse is built from each:

- landing: ``LakeWriter.add_ndjson_file`` into a local lake (baseline) and into ``s3://`` (staged,
  then one PUT per file);
- mirror: a second "machine" mirrors the tenant's lake prefix before it builds, beside the baseline
  of boto3 downloading the same objects one after another;
- build: the base tables from the local lake (baseline) and from the mirror, then the publish
  (upload) and a third machine's download of the published file.

moto is not AWS: the absolute MB/s say what this machine's loopback and moto sustain; the ratios
say what our layer costs over the plain operation. Prints peak RSS of this process.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TENANT = "bench"


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def write_ndjson(folder: Path, resources: int) -> tuple[list[Path], int]:
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    folder.mkdir(parents=True, exist_ok=True)
    per_type: dict[str, list[str]] = defaultdict(list)
    persons = max(10, resources // 120)
    pop = generate_population(PopulationSpec(seed=11, persons=persons))
    n = 0
    for org in pop.organizations:
        for r in pop.resources_for(org.id):
            per_type[r["resourceType"]].append(json.dumps(r, separators=(",", ":")))
            n += 1
            if n >= resources:
                break
        if n >= resources:
            break
    files = []
    for rtype, lines in sorted(per_type.items()):
        path = folder / f"{rtype}.ndjson"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files, n


def land(lake: str | Path, files: list[Path]) -> float:
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

    prov = Provenance(TENANT, "backend", "src", "org", None, "run-1")
    t0 = time.perf_counter()
    with LakeWriter(lake, prov) as writer:
        for f in files:
            writer.add_ndjson_file(f)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--resources", type=int, default=200_000)
    ap.add_argument("--generate-into", help=argparse.SUPPRESS)  # child process: write NDJSON only
    args = ap.parse_args()
    if args.generate_into:
        files, n = write_ndjson(Path(args.generate_into), args.resources)
        print(n)
        return 0

    import boto3

    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse

    proc, endpoint = start_moto()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    os.environ.pop("MEDBLOCKS_DATABASE_URL", None)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            # The synthetic population is generated in a child process, so the peak RSS below
            # is what landing, mirroring and building cost, not the generator's.
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--resources",
                    str(args.resources),
                    "--generate-into",
                    str(root / "ndjson"),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            n = int(child.stdout.strip().splitlines()[-1])
            files = sorted((root / "ndjson").glob("*.ndjson"))
            raw_mb = sum(f.stat().st_size for f in files) / 1e6
            print(f"{n:,} resources, {raw_mb:.1f} MB NDJSON in {len(files)} files")

            os.environ.pop("MEDBLOCKS_LAKE_ROOT", None)
            os.environ.pop("MEDBLOCKS_WAREHOUSE_DIR", None)
            local = get_settings(root / "local")
            local.ensure_dirs()
            t_land_local = land(local.lake, files)

            os.environ["MEDBLOCKS_LAKE_ROOT"] = "s3://bench/lake"
            os.environ["MEDBLOCKS_WAREHOUSE_DIR"] = "s3://bench/warehouses"
            a = get_settings(root / "machine-a")
            a.ensure_dirs()
            t_land_s3 = land(a.lake, files)

            keys = [
                o["Key"]
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench")
                for o in page.get("Contents", [])
            ]
            lake_mb = (
                sum(
                    s3.head_object(Bucket="bench", Key=k)["ContentLength"]
                    for k in keys
                    if k.startswith("lake/")
                )
                / 1e6
            )
            t0 = time.perf_counter()
            for k in keys:
                s3.get_object(Bucket="bench", Key=k)["Body"].read()
            t_plain_get = time.perf_counter() - t0

            build_warehouse(TENANT, settings=local, steps=[])  # warm-up: imports, DuckDB start
            t0 = time.perf_counter()
            built_local = build_warehouse(TENANT, settings=local, steps=[])
            t_build_local = time.perf_counter() - t0

            b = get_settings(root / "machine-b")
            b.ensure_dirs()
            t0 = time.perf_counter()
            built_remote = build_warehouse(TENANT, settings=b, steps=[])
            t_build_remote = time.perf_counter() - t0
            st = built_remote.storage
            assert built_remote.table_counts == built_local.table_counts, "warehouses differ"

            c = get_settings(root / "machine-c")
            c.ensure_dirs()
            t0 = time.perf_counter()
            with open_warehouse(TENANT, settings=c) as con:
                con.execute("SELECT count(*) FROM resources").fetchall()
            t_fetch = time.perf_counter() - t0
            wh_mb = st["published_bytes"] / 1e6

            lake_files = sum(k.startswith("lake/") for k in keys)
            print(f"lake: {lake_files} Parquet files, {lake_mb:.1f} MB")
            print(
                f"landing   local {t_land_local:6.2f} s ({n / t_land_local:,.0f} res/s)   "
                f"s3 {t_land_s3:6.2f} s ({n / t_land_s3:,.0f} res/s)   "
                f"ratio s3/local {t_land_local / t_land_s3:.2f}"
            )
            print(
                f"mirror    {st['mirror_seconds']:6.2f} s for {st['mirror_downloaded']} files "
                f"({st['mirror_bytes_downloaded'] / 1e6 / max(st['mirror_seconds'], 1e-9):.1f} MB/s)   "
                f"plain sequential boto3 GET of every object {t_plain_get:.2f} s   "
                f"ratio {t_plain_get / max(st['mirror_seconds'], 1e-9):.2f}"
            )
            print(
                f"build     local lake {t_build_local:6.2f} s   object-store lake (mirror + build + "
                f"publish) {t_build_remote:6.2f} s   ratio {t_build_local / t_build_remote:.2f}"
            )
            print(
                f"publish   {wh_mb:.1f} MB in {st['publish_seconds']:.2f} s "
                f"({wh_mb / max(st['publish_seconds'], 1e-9):.1f} MB/s)   "
                f"fetch on another machine {t_fetch:.2f} s ({wh_mb / t_fetch:.1f} MB/s)"
            )
            print(f"peak RSS {peak_rss_mib():.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

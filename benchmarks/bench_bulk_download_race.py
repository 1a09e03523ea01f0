"""Bulk sync race: `medblocks sync backend` (the whole CLI command, Parquet landing included)
against a minimal reference-style downloader, same sandbox server, same system export, one run.

    .venv/bin/python benchmarks/bench_bulk_download_race.py [--resources 38483] [--rounds 3]
        [--parallel 5] [--json-out PATH]

Generates N resources as NDJSON (the sandbox generator's streaming path) and serves them from a
sandbox EHR in a child process (SMART Backend Services + Bulk Data, a system-level export of the
files as generated; bench_bulk_download.start_server). Then, the order rotated every round, `rounds` times:

- ours: `python -m medblocks_pipelines.cli sync backend --full` in a subprocess: kick-off,
  wait, download, land into the Parquet lake, watermark, DELETE. Kick-off -> landed is read from
  the control plane (the export row's ``kicked_off_at`` -> ``updated_at`` at completion);
- baseline: this file in a subprocess (``--baseline``): its own client registration and
  backend-services token (PyJWT), kick-off, polling with Retry-After, then asyncio + httpx with
  P parallel downloads straight to NDJSON files (what the reference Bulk Data client does),
  timing kick-off -> last file written.

- library (the profile of ours, not a contender for the targets): ``sync_organization`` in a
  subprocess (``--library``), the same kick-off, wait, download and Parquet landing without the
  CLI or Dagster, into a tenant of its own.

Each reports kick-off -> landed (best round), the whole command (best round) and the peak RSS of
the whole process tree (the subprocess and its children, VmRSS summed, sampled every 20 ms). Ours
and the library's spans are split at the landing's start (the pull row): before it, the export
wait and, for the CLI, Dagster's start-up and run admission; after it, download + landing.
Targets (issue 17): kick-off -> landed >= 1.2x faster than the baseline; whole command within
1 s of our kick-off -> landed; peak RSS <= 256 MiB at this size.
"""

import argparse
import asyncio
import ctypes
import functools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASELINE_CLIENT = "race-baseline"
TARGET_SPEEDUP = 1.2
TARGET_RSS_MIB = 256.0
TARGET_STARTUP_S = 1.0


# -- process-tree RSS -------------------------------------------------------------------------
def _tree(pid: int) -> list[tuple[int, int | None]]:
    """Every process of the tree under ``pid``, each with its parent (None for ``pid``)."""
    out: list[tuple[int, int | None]] = []
    todo: list[tuple[int, int | None]] = [(pid, None)]
    while todo:
        p, parent = todo.pop()
        out.append((p, parent))
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend((int(c), p) for c in fh.read().split())
        except OSError:
            continue
    return out


#: kcmp(2) system call numbers (KCMP_VM tells whether two processes share one address space).
_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_VM = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _same_memory(a: int, b: int) -> bool:
    """Whether ``a`` is a child between vfork and exec, in ``b``'s own address space (kcmp
    KCMP_VM; where it is missing, identical ``statm`` readings stand for it)."""
    number = _KCMP.get(platform.machine())
    if number is not None:
        got = _libc().syscall(number, a, b, _KCMP_VM, 0, 0)
        if got >= 0:
            return got == 0
    try:
        with open(f"/proc/{a}/statm") as fa, open(f"/proc/{b}/statm") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def _tree_rss_kib(pid: int) -> int:
    """VmRSS summed over the process tree, each address space once.

    A child between vfork and exec (Dagster's compute-log capture starts ``tail`` and a Python
    watcher when a step starts, which in a CLI sync falls in the middle of the early landing)
    runs in its parent's address space, so its VmRSS is the parent's: summing both reported
    twice the process (one round in two to six read ~900 MiB for a ~450 MiB process)."""
    total = 0
    for p, parent in _tree(pid):
        if parent is not None and _same_memory(p, parent):
            continue
        total += _rss_kib(p)
    return total


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(
    cmd: list[str], env: dict[str, str], cwd: str | None = None
) -> tuple[float, float, float, str]:
    """Run ``cmd``; returns wall seconds, peak RSS of its process tree (MiB), its CPU seconds
    (user + system of the tree: steadier than wall time on a shared machine) and its stdout."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kib(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.stderr.write(err.decode(errors="replace")[-4000:])
        raise RuntimeError(f"{cmd[1:4]} exited {proc.returncode}")
    return wall, peak / 1024, _children_cpu() - cpu0, out.decode(errors="replace")


# -- the baseline downloader (child process) --------------------------------------------------
async def _baseline(base: str, key_file: str, out_dir: str, parallel: int) -> dict[str, Any]:
    import httpx
    import jwt

    fhir = f"{base}/fhir"
    key = Path(key_file).read_text()
    async with httpx.AsyncClient(timeout=120) as http:
        conf = (await http.get(f"{fhir}/.well-known/smart-configuration")).json()
        endpoint = conf["token_endpoint"]
        now = int(time.time())
        claims = {"iss": BASELINE_CLIENT, "sub": BASELINE_CLIENT, "aud": endpoint}
        claims |= {"exp": now + 240, "iat": now, "jti": os.urandom(12).hex()}
        assertion = jwt.encode(claims, key, algorithm="ES384", headers={"kid": "race-1"})
        started = time.time()
        resp = await http.post(
            endpoint,
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
        )
        resp.raise_for_status()
        auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}
        resp = await http.get(
            f"{fhir}/$export",
            headers={**auth, "Accept": "application/fhir+json", "Prefer": "respond-async"},
        )
        if resp.status_code != 202:
            raise RuntimeError(f"kick-off answered {resp.status_code}")
        status_url = resp.headers["Content-Location"]
        while True:
            resp = await http.get(status_url, headers=auth)
            if resp.status_code == 200:
                manifest = resp.json()
                break
            if resp.status_code != 202:
                raise RuntimeError(f"status answered {resp.status_code}")
            await asyncio.sleep(float(resp.headers.get("Retry-After") or 1) or 0.05)
        gate = asyncio.Semaphore(parallel)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)

        async def fetch(n: int, item: dict[str, Any]) -> tuple[int, int]:
            async with gate:
                lines = size = 0
                headers = {**auth} if manifest.get("requiresAccessToken") else {}
                headers["Accept"] = "application/fhir+ndjson"
                target = out / f"{n:05d}.{item['type']}.ndjson"
                with open(target, "wb") as fh:
                    async with http.stream("GET", item["url"], headers=headers) as r:
                        r.raise_for_status()
                        async for chunk in r.aiter_bytes(1 << 20):
                            fh.write(chunk)
                            size += len(chunk)
                            lines += chunk.count(b"\n")
                return lines, size

        got = await asyncio.gather(*(fetch(n, i) for n, i in enumerate(manifest["output"])))
        landed = time.time()
        await http.delete(status_url, headers=auth)
    return {
        "kickoff_to_landed": landed - started,
        "resources": sum(g[0] for g in got),
        "bytes": sum(g[1] for g in got),
        "files": len(got),
    }


def register_baseline(base: str, work: Path) -> Path:
    """Register the baseline's own backend client (its own key) at the sandbox."""
    import httpx
    from bench_bulk_download import ADMIN_SECRET
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from medblocks_sandbox.ehr_common import ADMIN_HEADER

    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = work / "baseline-key.pem"
    path.write_bytes(pem)
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk |= {"kid": "race-1", "alg": "ES384", "use": "sig"}
    resp = httpx.post(
        f"{base}/_admin/clients",
        headers={ADMIN_HEADER: ADMIN_SECRET},
        json={
            "client_id": BASELINE_CLIENT,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [jwk]},
            "scopes": ["system/*.rs"],
        },
    )
    resp.raise_for_status()
    return path


# -- ours ---------------------------------------------------------------------------------------
def ours_round(cp: Any, env: dict[str, str], code: str | None = None) -> dict[str, float]:
    cmd = [sys.executable, "-m", "medblocks_pipelines.cli", "sync", "backend"]
    cmd += ["--tenant", "bench", "--org", "bench-org", "--full"]
    # Run in the raced checkout: `python -m` puts the working directory ahead of PYTHONPATH, so
    # from another checkout's folder --code would race that checkout's CLI instead.
    wall, rss, cpu, _ = run_measured(cmd, env, cwd=code)
    ended = time.time()
    span = _export_span(cp, "bench")
    # The rest of the whole command: start-up before the kick-off, and what follows the landing
    # (the Dagster run's end, the command's report, interpreter exit).
    before = span.pop("kicked_off_at") - (ended - wall)
    after = ended - span.pop("landed_at")
    return {
        **span,
        "before_kickoff": before,
        "after_landed": after,
        "whole": wall,
        "rss": rss,
        "cpu": cpu,
    }


def _export_span(cp: Any, tenant: str) -> dict[str, float]:
    """Kick-off -> landed of the tenant's last export (control plane), split at the landing's
    start (its pull row): before it, the wait for the export and (CLI) Dagster's start-up and
    run admission; after it, download + Parquet landing + completion."""
    row = cp.list_bulk_exports(tenant_id=tenant, organization_id=f"{tenant}-org")[-1]
    assert row.status == "completed", row.status
    pull = next(p for p in cp.list_pulls(tenant_id=tenant) if p.run_id == row.run_id)
    return {
        "kickoff_to_landed": (row.updated_at - row.kicked_off_at).total_seconds(),
        "kickoff_to_landing_start": (pull.started_at - row.kicked_off_at).total_seconds(),
        "landing": (row.updated_at - pull.started_at).total_seconds(),
        "landed": row.counts["landed"],
        "kicked_off_at": row.kicked_off_at.timestamp(),
        "landed_at": row.updated_at.timestamp(),
    }


def library_round(cp: Any, env: dict[str, str], code: str) -> dict[str, float]:
    """The same sync through the library alone (``sync_organization``: kick-off, wait, download,
    Parquet landing, watermark, DELETE) in a child process: no CLI, no Dagster. Where the CLI's
    time goes beyond the landing itself."""
    cmd = [sys.executable, __file__, "--library", "lib"]
    wall, rss, cpu, _ = run_measured(cmd, env, cwd=code)
    span = _export_span(cp, "lib")
    del span["kicked_off_at"], span["landed_at"]
    return {**span, "whole": wall, "rss": rss, "cpu": cpu}


def _library_sync(tenant: str) -> None:
    from medblocks_pipelines.lib.fhir.bulk_sync import sync_organization
    from medblocks_pipelines.lib.registry import open_control_plane
    from medblocks_pipelines.lib.settings import get_settings

    settings = get_settings()
    cp = open_control_plane(settings)
    sync_organization(
        cp,
        settings,
        tenant,
        f"{tenant}-org",
        run_id=f"lib-{os.urandom(4).hex()}",
        full=True,
        min_wait=0.05,
    )


def baseline_round(base: str, key: Path, work: Path, parallel: int, env: dict[str, str]) -> Any:
    out = work / "baseline-out"
    cmd = [sys.executable, __file__, "--baseline", base, str(key), str(out), str(parallel)]
    wall, rss, cpu, stdout = run_measured(cmd, env)
    shutil.rmtree(out, ignore_errors=True)
    md = json.loads(stdout.strip().splitlines()[-1])
    return {**md, "whole": wall, "rss": rss, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=38_483)
    parser.add_argument("--files-per-type", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", help="Write the figures as JSON to this path.")
    parser.add_argument(
        "--code", help="Race the CLI of another checkout (e.g. main, for a before/after)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    parser.add_argument(
        "--export-seconds",
        type=float,
        default=0.0,
        help="The server takes this long to prepare each export (default 0: ready at once, the "
        "targets' setting); polls are answered 202 with --retry-after.",
    )
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--baseline", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        base, key, out, parallel = args.baseline
        print(json.dumps(asyncio.run(_baseline(base, key, out, int(parallel)))))
        return
    if args.library:
        _library_sync(args.library)
        return
    from bench_bulk_download import generate, prepare_registry, start_server

    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]), int(args.generate[2]))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-race-"))
    proc = None
    try:
        gen = [sys.executable, __file__, "--generate", str(work / "src")]
        subprocess.run([*gen, str(args.resources), str(args.files_per_type)], check=True)
        proc, base = start_server(
            work / "src",
            work,
            export_seconds=args.export_seconds,
            retry_after=args.retry_after if args.export_seconds else 0,
        )
        settings, cp = prepare_registry(base, work / "data", parallel=args.parallel, gzip=False)
        key = register_baseline(base, work)
        cp.add_tenant("lib", "Library")  # the library contender's own tenant, same source
        cp.add_organization("lib-org", "lib", "bench-ehr", "Library Org", {"level": "system"})
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
        env["MEDBLOCKS_DATA_DIR"] = str(work / "data")
        code = args.code or str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")])
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, Any]] = []
        lib: list[dict[str, float]] = []
        for n in range(args.rounds):  # rotate the order every round
            order = ["ours", "baseline", "library"]
            order = order[n % 3 :] + order[: n % 3]
            for who in order:
                if who == "ours":
                    ours.append(ours_round(cp, env, code))
                    got: dict[str, Any] = ours[-1]
                elif who == "library":
                    lib.append(library_round(cp, env, code))
                    got = lib[-1]
                else:
                    theirs.append(baseline_round(base, key, work, args.parallel, env))
                    got = theirs[-1]
                print(f"round {n + 1} {who}: " + json.dumps(got))
        report(args, ours, theirs, lib)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(
    args: Any,
    ours: list[dict[str, float]],
    theirs: list[dict[str, Any]],
    lib: list[dict[str, float]],
) -> None:
    assert all(o["landed"] == args.resources for o in ours + lib), [o["landed"] for o in ours]
    assert all(t["resources"] == args.resources for t in theirs), [t["resources"] for t in theirs]
    o_span = min(o["kickoff_to_landed"] for o in ours)
    t_span = min(t["kickoff_to_landed"] for t in theirs)
    o_whole = min(o["whole"] for o in ours)
    t_whole = min(t["whole"] for t in theirs)
    o_rss = max(o["rss"] for o in ours)
    t_rss = max(t["rss"] for t in theirs)
    speedup = t_span / o_span
    startup = o_whole - o_span
    print(f"{args.resources:,} resources, {args.rounds} alternating rounds, best of each")
    print(f"kick-off -> landed : ours {o_span:6.2f} s   baseline {t_span:6.2f} s   ", end="")
    print(f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP})")
    print(f"whole command      : ours {o_whole:6.2f} s   baseline {t_whole:6.2f} s   ", end="")
    print(f"ours beyond kick-off -> landed {startup:.2f} s (target <= {TARGET_STARTUP_S})")
    print(f"peak RSS (tree)    : ours {o_rss:6.0f} MiB baseline {t_rss:6.0f} MiB ", end="")
    print(f"(target <= {TARGET_RSS_MIB:.0f})")
    o_cpu = min(o["cpu"] for o in ours)
    t_cpu = min(t["cpu"] for t in theirs)
    print(f"CPU s (tree)       : ours {o_cpu:6.2f} s   baseline {t_cpu:6.2f} s")
    # Where ours' time goes (its best round): before the landing starts (export wait, Dagster's
    # start-up, run admission), the landing itself; and the library alone, without CLI/Dagster.
    best = min(ours, key=lambda o: o["kickoff_to_landed"])
    l_span = min(x["kickoff_to_landed"] for x in lib)
    l_land = min(x["landing"] for x in lib)
    print(
        f"ours, split        : kick-off -> landing start {best['kickoff_to_landing_start']:.2f} s"
        f" (export ready, Dagster start-up, run admission), landing {best['landing']:.2f} s;"
        f" outside the span: {best['before_kickoff']:.2f} s before the kick-off,"
        f" {best['after_landed']:.2f} s after the landing"
    )
    print(
        f"library alone      : kick-off -> landed {l_span:.2f} s (landing {l_land:.2f} s), "
        f"whole {min(x['whole'] for x in lib):.2f} s, peak RSS {max(x['rss'] for x in lib):.0f} "
        f"MiB, CPU {min(x['cpu'] for x in lib):.2f} s: {t_span / l_span:.2f}x the baseline"
    )
    if args.json_out:
        figures = {
            "bulk_download_race": {
                "value": round(o_span, 3),
                "baseline": round(t_span, 3),
                "ratio": round(speedup, 3),
                "target": TARGET_SPEEDUP,
                "met": speedup >= TARGET_SPEEDUP
                and startup <= TARGET_STARTUP_S
                and o_rss <= TARGET_RSS_MIB,
                "peak_rss_mib": round(o_rss, 1),
                "whole_command_s": round(o_whole, 3),
                "baseline_whole_command_s": round(t_whole, 3),
                "startup_s": round(startup, 3),
                "baseline_peak_rss_mib": round(t_rss, 1),
                "cpu_s": round(o_cpu, 2),
                "baseline_cpu_s": round(t_cpu, 2),
                "kickoff_to_landing_start_s": round(best["kickoff_to_landing_start"], 3),
                "landing_s": round(best["landing"], 3),
                "before_kickoff_s": round(best["before_kickoff"], 3),
                "after_landed_s": round(best["after_landed"], 3),
                "export_seconds": args.export_seconds,
                "library_kickoff_to_landed_s": round(l_span, 3),
                "library_landing_s": round(l_land, 3),
                "library_peak_rss_mib": round(max(x["rss"] for x in lib), 1),
                "resources": args.resources,
            }
        }
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

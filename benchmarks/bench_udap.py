"""UDAP and Facilitated FHIR: registration + token latency, and a fan-out bounded by its timeout.

    .venv/bin/python benchmarks/bench_udap.py [--registrations 10] [--tokens 30] [--nodes 20]
        [--slow 3] [--timeout 5.0]

The UDAP sandbox (CA + CRLs, strict authorization servers, FHIR nodes, directory) runs in a child
process, so its signature checks do not share our GIL. Measured over loopback:

1. discovery with ``signed_metadata`` (chain to the anchor + CRL fetch), trusted dynamic
   registration (software statement + TEFCA certification, RS256), B2B token requests
   (``private_key_jwt`` with ``hl7-b2b``, a new ``jti`` each): p50 / p95 / max.
2. one Facilitated FHIR query (policy, audit, directory, UDAP, $match, 8 US Core searches per node,
   landing) fanned out to ``--nodes`` nodes of which ``--slow`` answer only after 3x the per-node
   timeout: the whole query must end near ``--timeout`` (the overhead is reported), cold (first
   registration + token at every node) and warm (registrations stored, tokens cached).
"""

import argparse
import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _serve(conn: Any, nodes: int, slow: int, delay: float) -> None:
    """Child: start the sandbox, send back its URL, the anchor and our issued identity; wait."""
    from medblocks_pipelines.lib.network.udap.certs import chain_pem
    from medblocks_pipelines_tests.network.udap_support import PURPOSES, SAN, node_resources
    from medblocks_sandbox.run import serve
    from medblocks_sandbox.udap import NodeSpec, create_udap_app

    specs = [
        NodeSpec(
            f"node-{i:02d}",
            f"Node {i}",
            node_resources(f"n{i}"),
            fault="slow" if i < slow else "ok",
            delay_s=delay,
        )
        for i in range(nodes)
    ]
    holder: dict[str, Any] = {}

    def factory(base: str) -> Any:
        holder["sb"] = create_udap_app(base, specs)
        return holder["sb"].app

    with serve(factory) as base:
        sb = holder["sb"]
        key, chain = sb.ca.issue([f"{SAN}#{p}" for p in PURPOSES])
        conn.send((base, sb.ca.anchor_pem(), key, chain_pem(chain)))
        conn.recv()  # until the parent is done


def _pct(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return (
        f"p50 {statistics.median(xs) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  "
        f"max {xs[-1] * 1000:7.1f} ms  (n={len(xs)})"
    )


def _env(tmp: Path, base: str, anchor: bytes, key: bytes, chain: bytes, timeout: float) -> Any:
    from medblocks_pipelines.lib.network.udap.certs import store_identity
    from medblocks_pipelines_tests.network.udap_support import UdapEnv

    env = UdapEnv(tmp, contextlib.ExitStack())
    store_identity(env.cp.vault, "acme", key, chain)
    block = {
        "directory_url": f"{base}/directory",
        "trust_anchor_pem": anchor.decode(),
        "identity": "acme",
        "timeout_s": timeout,
        "max_parallel": 32,
    }
    env.cp.add_source(
        "sandbox-fhir",
        "Bench",
        "sandbox",
        "network",
        None,
        ["network"],
        config={"facilitated_fhir": block},
    )
    env.launch()
    return env


def bench_udap(env: Any, base: str, registrations: int, tokens: int) -> None:
    import httpx

    from medblocks_pipelines.lib.network.udap.certs import CrlChecker, VaultSigner, load_pem_chain
    from medblocks_pipelines.lib.network.udap.discovery import discover
    from medblocks_pipelines.lib.network.udap.registration import ClientProfile, register
    from medblocks_pipelines.lib.network.udap.token import Requestor, request_token

    anchors = load_pem_chain(
        env.cp.get_source("sandbox-fhir").config["facilitated_fhir"]["trust_anchor_pem"].encode()
    )
    signer = VaultSigner(env.cp.vault, "acme")
    fhir = f"{base}/nodes/node-19/fhir"
    with httpx.Client() as http:
        disc = []
        for _ in range(registrations):
            t = time.perf_counter()
            meta = discover(http, fhir, anchors, crl=CrlChecker(http))  # cold CRL each time
            disc.append(time.perf_counter() - t)
        assert meta is not None
        regs, reg = [], None
        profile = ClientProfile("Bench", ("mailto:bench@example.test",))
        for _ in range(registrations):
            t = time.perf_counter()
            reg = register(
                http, meta, signer, profile, network="b", node="node-19", purpose="T-TREAT"
            )
            regs.append(time.perf_counter() - t)
        assert reg is not None
        req = Requestor("Bench Org", "urn:oid:1.2.3", "bench")
        toks = []
        for _ in range(tokens):
            t = time.perf_counter()
            request_token(http, meta.token_endpoint, signer, reg, req, "T-TREAT")
            toks.append(time.perf_counter() - t)
    print(f"discovery + signed_metadata + CRL : {_pct(disc)}")
    print(f"registration (201, then 200)      : {_pct(regs)}")
    print(f"B2B token (hl7-b2b, RS256)         : {_pct(toks)}")


def bench_fan_out(env: Any, nodes: int, slow: int, timeout: float) -> None:
    for label in ("cold", "warm"):
        t = time.perf_counter()
        result = env.query()
        took = time.perf_counter() - t
        statuses: dict[str, int] = {}
        for s in result.gateway_status.values():
            statuses[s] = statuses.get(s, 0) + 1
        print(
            f"fan-out {label}: {nodes} nodes ({slow} slow), per-node timeout {timeout:.1f}s -> "
            f"whole query {took:.2f}s (fan-out {result.elapsed_s:.2f}s, overhead "
            f"{took - timeout:+.2f}s); status {result.status} {statuses}; "
            f"resources {sum(result.resources_by_type.values())}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--registrations", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--slow", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=_serve, args=(child, args.nodes, args.slow, args.timeout * 3), daemon=True
    )
    proc.start()
    base, anchor, key, chain = parent.recv()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = _env(Path(tmp), base, anchor, key, chain, args.timeout)
            bench_udap(env, base, args.registrations, args.tokens)
            bench_fan_out(env, args.nodes, args.slow, args.timeout)
    finally:
        parent.send("stop")
        proc.join(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

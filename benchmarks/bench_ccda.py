"""C-CDA -> FHIR conversion throughput beside an lxml parse-only baseline of the same documents.

    .venv/bin/python benchmarks/bench_ccda.py [--size N]

Renders N CCDs (the sandbox renderer, synthetic data with ~10 entries per domain), then times:
(1) hardened-lxml parse only, (2) parse + full conversion to FHIR R4 dicts. Prints documents/s,
resources/s, the conversion/parse ratio and peak RSS.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medblocks_pipelines.lib.network.ccda import SourceDocument, convert_ccda  # noqa: E402
from medblocks_pipelines.lib.network.safexml import parse_untrusted  # noqa: E402
from medblocks_pipelines_tests.network.fixtures import ORG, patient_bundle  # noqa: E402
from medblocks_sandbox.gateway.render import render_ccd  # noqa: E402


def _documents(n: int, repeat: int) -> list[bytes]:
    docs = []
    for i in range(n):
        patient, base = patient_bundle(f"p{i}")
        resources = []
        for k in range(repeat):  # widen each document: `repeat` copies of every fact, new ids
            for r in base:
                r2 = dict(r)
                r2["id"] = f"{r['id']}-{k}"
                resources.append(r2)
        docs.append(
            render_ccd(patient, resources, org=ORG, document_id=f"2.16.840.1.113883.3.9999.4.9.{i}")
        )
    return docs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=200, help="number of documents")
    ap.add_argument("--repeat", type=int, default=10, help="copies of each fact per document")
    args = ap.parse_args()
    docs = _documents(args.size, args.repeat)
    total_mb = sum(len(d) for d in docs) / 1e6

    t0 = time.perf_counter()
    for d in docs:
        parse_untrusted(d)
    parse_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_res = n_q = 0
    for i, d in enumerate(docs):
        r = convert_ccda(
            d, SourceDocument("urn:oid:2.16.840.1.113883.3.9999.4", "1.2", f"1.2.3.{i}")
        )
        n_res += len(r.resources)
        n_q += len(r.quarantined)
    conv_s = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"documents: {len(docs)}  ({total_mb:.1f} MB, avg {total_mb * 1000 / len(docs):.0f} kB)")
    print(
        f"lxml parse only (baseline): {len(docs) / parse_s:,.0f} docs/s  ({total_mb / parse_s:.1f} MB/s)"
    )
    print(
        f"parse + convert:            {len(docs) / conv_s:,.0f} docs/s  {n_res / conv_s:,.0f} resources/s"
        f"  ({n_res} resources, {n_q} quarantined)"
    )
    print(f"ratio convert/parse time:   {conv_s / parse_s:.1f}x")
    print(f"peak RSS: {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()

"""Pairwise precision and recall of a clustering against ground truth."""

from collections.abc import Mapping
from itertools import combinations
from typing import Any

import duckdb
import polars as pl


def pairwise_metrics(
    predicted: Mapping[str, str], truth: Mapping[str, str]
) -> dict[str, float | int]:
    """Pairwise precision/recall of a clustering against ground truth (both: record -> cluster).

    Only records present in both mappings count. A pair is positive when both records share a cluster.
    """
    common = [k for k in predicted if k in truth]
    pred_pairs = _pairs(common, predicted)
    true_pairs = _pairs(common, truth)
    tp = len(pred_pairs & true_pairs)
    fp = len(pred_pairs - true_pairs)
    fn = len(true_pairs - pred_pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {
        "records": len(common),
        "true_pairs": len(true_pairs),
        "predicted_pairs": len(pred_pairs),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
    }


def pairwise_metrics_frame(df: pl.DataFrame) -> dict[str, float | int]:
    """:func:`pairwise_metrics` by counting, for millions of records.

    ``df`` has one row per record with columns ``pred`` and ``truth`` (cluster labels). Pairs are
    counted as sums of n*(n-1)/2 over clusters and over (pred, truth) intersections, never listed.
    """

    def pairs(cols: list[str]) -> int:
        sizes = df.group_by(cols).agg(n=pl.len()).get_column("n").cast(pl.Int64)
        return int((sizes * (sizes - 1) // 2).sum())

    predicted, true, tp = pairs(["pred"]), pairs(["truth"]), pairs(["pred", "truth"])
    fp, fn = predicted - tp, true - tp
    return {
        "records": df.height,
        "true_pairs": true,
        "predicted_pairs": predicted,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / predicted if predicted else 1.0,
        "recall": tp / true if true else 1.0,
    }


def _pairs(records: list[str], cluster_of: Mapping[str, str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(cluster_of[r], []).append(r)
    out: set[tuple[str, str]] = set()
    for members in groups.values():
        out.update(combinations(sorted(members), 2))
    return out


def evaluate_warehouse(con: duckdb.DuckDBPyConnection, truth: Mapping[str, str]) -> dict[str, Any]:
    """Pairwise metrics of a built warehouse's ``patient_links`` against ``truth`` (key -> person).

    What ``medblocks warehouse identity evaluate`` reports.
    """
    pred = dict(con.execute("SELECT patient_key, person_id FROM patient_links").fetchall())
    metrics: dict[str, Any] = dict(pairwise_metrics(pred, truth))
    metrics["truth_records"] = len(truth)
    metrics["unmatched_truth_records"] = len(set(truth) - set(pred))
    return metrics

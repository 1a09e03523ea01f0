"""Differential test: every leaf path present in real-shaped data, read through the compiled
DuckDB view and through the per-resource fhirpathpy evaluator, must give the same collection.

The paths are derived from the data itself (choice elements as ``x.ofType(T)``), so this checks the
schema-driven compilation (what repeats, what is a choice, decimal and date handling) against a
dynamic FHIRPath engine on shapes nobody chose by hand.
"""

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.views import run_view
from medblocks_pipelines.lib.warehouse.views.runner import _norm
from medblocks_pipelines.lib.warehouse.views.schema import PRIMITIVE_TYPES, load_schema
from medblocks_pipelines_tests.support.views_reference import evaluate_view

from .conftest import FIXTURES, resources_table

_KEYWORDS = {"div", "mod", "and", "or", "xor", "implies", "true", "false"}


def leaf_paths(resource: dict[str, Any]) -> set[str]:
    """FHIRPath of every primitive value in ``resource`` (unknown elements skipped)."""
    schema = load_schema()
    out: set[str] = set()

    def walk(obj: dict[str, Any], tname: str, prefix: str) -> None:
        for key, val in obj.items():
            if key == "resourceType" or key.startswith("_"):
                continue
            el = schema.element(tname, key)
            if el is None or el.type == "Resource":
                continue
            # FHIRPath keywords (Narrative.div) must be written as delimited identifiers
            name = f"`{key}`" if key in _KEYWORDS else key
            step = name if el.choice_of is None else f"{el.choice_of}.ofType({el.type})"
            path = f"{prefix}.{step}" if prefix else step
            if el.type in PRIMITIVE_TYPES:
                out.add(path)
                continue
            for item in val if isinstance(val, list) else [val]:
                if isinstance(item, dict):
                    walk(item, el.type, path)

    walk(resource, resource["resourceType"], "")
    return out


def _lines() -> list[str]:
    return [ln for ln in (FIXTURES / "real_shaped.ndjson").read_text().splitlines() if ln]


def _cases() -> list[Any]:
    by_type: dict[str, set[str]] = {}
    for line in _lines():
        res = json.loads(line)
        by_type.setdefault(res["resourceType"], set()).update(leaf_paths(res))
    return [
        pytest.param(rtype, sorted(paths), id=rtype) for rtype, paths in sorted(by_type.items())
    ]


def _compare(lines: list[str], resource_type: str, paths: list[str]) -> None:
    resources = [json.loads(ln, parse_float=Decimal) for ln in lines]
    con = duckdb.connect()
    resources_table(con, lines)
    columns = [{"name": "rid", "path": "id"}]
    for n, path in enumerate(paths):
        columns.append({"name": f"c{n}", "path": path, "collection": True})
        columns.append({"name": f"n{n}", "path": f"{path}.count()"})
        columns.append({"name": f"e{n}", "path": f"{path}.exists()"})
        columns.append({"name": f"f{n}", "path": f"{path}.first()"})
        columns.append({"name": f"l{n}", "path": f"{path}.last()"})
    view = {"resource": resource_type, "select": [{"column": columns}]}
    got = {r["rid"]: r for r in run_view(con, view, passthrough_columns=[]).to_pylist()}
    expected = {r["rid"]: r for r in evaluate_view(view, resources)}
    assert got.keys() == expected.keys()
    for rid, row in expected.items():
        for n, path in enumerate(paths):
            for key in (f"c{n}", f"n{n}", f"e{n}", f"f{n}", f"l{n}"):
                assert _norm(got[rid][key]) == _norm(row[key]), (rid, path, key)


@pytest.mark.parametrize(("resource_type", "paths"), _cases())
def test_every_leaf_path_matches_fhirpathpy(resource_type: str, paths: list[str]) -> None:
    _compare(_lines(), resource_type, paths)


def test_every_leaf_path_of_the_generated_population(tmp_path: Path) -> None:
    from medblocks_sandbox.generator.ndjson import stream_bulk_ndjson

    stream_bulk_ndjson(tmp_path, resources=800, seed=3)
    by_type: dict[str, list[str]] = {}
    paths: dict[str, set[str]] = {}
    for f in sorted(tmp_path.glob("*.ndjson")):
        for line in f.read_text().splitlines():
            res = json.loads(line)
            by_type.setdefault(res["resourceType"], []).append(line)
            paths.setdefault(res["resourceType"], set()).update(leaf_paths(res))
    assert len(by_type) >= 10
    for rtype, lines in sorted(by_type.items()):
        _compare(lines, rtype, sorted(paths[rtype]))


def test_every_leaf_path_of_carebundle_shapes() -> None:
    carebundle = pytest.importorskip("carebundle")
    ndjson = carebundle.to_ndjson(carebundle.generate_cohort(count=6, seed=9))
    for rtype, text in sorted(ndjson.items()):
        lines = [ln for ln in text.splitlines() if ln]
        paths: set[str] = set()
        for line in lines:
            paths.update(leaf_paths(json.loads(line)))
        _compare(lines, rtype, sorted(paths))

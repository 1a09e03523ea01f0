"""Fixtures of the warehouse tests: a synthetic population landed through the lake, one built warehouse.

The generator's organizations reach the tenant through the four patterns, as in the demo: Mercy General
by backend sync, Lakeside Clinic by clinician workflow, the Summit payer by patient access, Riverside and
Valley through the exchange network. Each organization lands as its own source, so every source patient
and fact has ground truth (``pop.truth``, ``pop.fact_truth``).
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.registry.rows import Connection, Pull
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines.lib.warehouse.build import BuildResult, build_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_sandbox.generator import Population, PopulationSpec, generate_population

TENANT = "acme"
PATTERN_OF_ORG = {
    "mercy-general": "backend",
    "lakeside-clinic": "clinician_workflow",
    "summit-health-plan": "patient_access",
    "riverside-health": "network",
    "valley-medical": "network",
}
# The exchange purpose each network organization's rows were obtained for (two purposes, so the
# consumers' read policy has something to tell apart).
PURPOSE_OF_ORG = {"riverside-health": "T-TREAT", "valley-medical": "T-PYMNT"}


class FakeControlPlane:
    """The two control-plane calls a warehouse build makes, with fixed answers."""

    def __init__(self, connections: list[Connection] | None = None) -> None:
        self.connections = connections or []

    def list_pulls(self, tenant_id: str, limit: int = 100_000) -> list[Pull]:
        return []

    def list_connections(self, **filters: Any) -> list[Connection]:
        return [
            c
            for c in self.connections
            if all(getattr(c, k) == v for k, v in filters.items() if v is not None)
        ]


def land_population(settings: Settings, pop: Population, *, run_id: str = "run-1") -> None:
    """Land every organization's resources into the lake, one source per organization."""
    for org in pop.organizations:
        prov = Provenance(
            tenant=TENANT,
            pattern=PATTERN_OF_ORG[org.id],
            source=org.id,
            organization=org.id,
            connection=f"conn-{org.id}",
            run_id=run_id,
            permitted_purpose=PURPOSE_OF_ORG.get(org.id),
            network_query_id=f"q-{org.id}" if org.id in PURPOSE_OF_ORG else None,
        )
        with LakeWriter(settings.lake_root, prov) as w:
            for r in pop.resources_for(org.id):
                w.add(json.dumps(r))


@dataclass
class Built:
    """A population and the warehouse built from it."""

    pop: Population
    settings: Settings
    result: BuildResult

    def connect(self) -> duckdb.DuckDBPyConnection:
        return duckdb.connect(str(self.result.path), read_only=True)


@pytest.fixture(scope="session")
def population() -> Population:
    """A small seeded population (60 persons, ~11k resources)."""
    return generate_population(PopulationSpec(seed=11, persons=60))


@pytest.fixture(scope="session")
def built(population: Population, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The population landed and its warehouse built once for the session (read-only use)."""
    root: Path = tmp_path_factory.mktemp("warehouse")
    settings = get_settings(root / "data")
    settings.ensure_dirs()
    land_population(settings, population)
    result = build_warehouse(TENANT, settings=settings, control_plane=FakeControlPlane())
    yield Built(population, settings, result)


@pytest.fixture
def wh(built: Built) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the session's warehouse."""
    con = built.connect()
    try:
        yield con
    finally:
        con.close()

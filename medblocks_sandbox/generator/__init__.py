"""Seeded, deterministic synthetic population for the sandbox.

pop = generate_population(PopulationSpec(seed=42, persons=100))
pop.resources_for("mercy-general"); pop.truth; pop.fact_truth; pop.logins
changes = evolve(pop, step=1)
write_ndjson(pop, out_dir)
stream_bulk_ndjson(out_dir, resources=1_000_000, seed=7)   # the scale path
"""

from medblocks_sandbox.generator.evolve import evolve
from medblocks_sandbox.generator.model import (
    REFERENCE_DATE,
    Address,
    Changes,
    OrgInfo,
    PersonTruth,
    PopulationSpec,
    PortalLogin,
)
from medblocks_sandbox.generator.ndjson import stream_bulk_ndjson, write_ndjson
from medblocks_sandbox.generator.population import Population, generate_population

__all__ = [
    "REFERENCE_DATE",
    "Address",
    "Changes",
    "OrgInfo",
    "PersonTruth",
    "Population",
    "PopulationSpec",
    "PortalLogin",
    "evolve",
    "generate_population",
    "stream_bulk_ndjson",
    "write_ndjson",
]

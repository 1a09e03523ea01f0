"""Shared populations for the generator tests (generated once per session: generation is pure)."""

import pytest

from medblocks_sandbox.generator import Population, PopulationSpec, generate_population


@pytest.fixture(scope="session")
def pop() -> Population:
    """A 120-person world, never mutated by tests (evolve tests build their own)."""
    return generate_population(PopulationSpec(seed=42, persons=120))


@pytest.fixture(scope="session")
def twins_pop() -> Population:
    """A world with many twin pairs."""
    return generate_population(PopulationSpec(seed=5, persons=80, twin_rate=0.3))

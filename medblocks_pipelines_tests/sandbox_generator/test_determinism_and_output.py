"""Determinism (same seed -> byte-identical files) and the NDJSON writer with its truth files."""

import csv
import hashlib
import json
from pathlib import Path

from medblocks_sandbox.generator import (
    PopulationSpec,
    evolve,
    generate_population,
    write_ndjson,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_output(tmp_path: Path) -> None:
    a = generate_population(PopulationSpec(seed=11, persons=25))
    b = generate_population(PopulationSpec(seed=11, persons=25))
    write_ndjson(a, tmp_path / "a")
    write_ndjson(b, tmp_path / "b")
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da == db
    assert len(da) > 40


def test_different_seed_gives_different_output(tmp_path: Path) -> None:
    write_ndjson(generate_population(PopulationSpec(seed=11, persons=20)), tmp_path / "a")
    write_ndjson(generate_population(PopulationSpec(seed=12, persons=20)), tmp_path / "b")
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da.keys() & db.keys()
    assert da["mercy-general/Observation.ndjson"] != db.get("mercy-general/Observation.ndjson")


def test_evolve_is_deterministic_too(tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        pop = generate_population(PopulationSpec(seed=3, persons=30))
        ch1, ch2 = evolve(pop, 1), evolve(pop, 2)
        outs.append(
            json.dumps(
                [ch1.created, ch1.updated, ch1.deleted, ch2.created, ch2.updated, ch2.deleted],
                sort_keys=True,
            )
        )
        write_ndjson(pop, tmp_path / name)
    assert outs[0] == outs[1]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_a_prefix_of_persons_is_stable_when_the_population_grows() -> None:
    # each person draws from their own seeded stream, so growing the world keeps earlier people
    small = generate_population(PopulationSpec(seed=9, persons=10))
    big = generate_population(PopulationSpec(seed=9, persons=25))
    assert small.persons == big.persons[:10]


def test_write_ndjson_layout_and_truth_files(tmp_path: Path) -> None:
    pop = generate_population(PopulationSpec(seed=8, persons=25))
    result = write_ndjson(pop, tmp_path)
    assert result["resources"] == pop.resource_count
    lines = 0
    for org in pop.org_ids:
        for path in (tmp_path / org).glob("*.ndjson"):
            for line in path.read_text().splitlines():
                r = json.loads(line)
                assert r["resourceType"] == path.stem
                lines += 1
    assert lines == pop.resource_count
    with (tmp_path / "truth" / "identity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["org_id"], r["source_patient_id"], r["person_id"]) for r in rows} == set(pop.truth)
    with (tmp_path / "truth" / "facts.csv").open() as f:
        assert sum(1 for _ in csv.DictReader(f)) == len(pop.fact_truth)
    persons = json.loads((tmp_path / "truth" / "persons.json").read_text())
    assert [p["person_id"] for p in persons] == [p.person_id for p in pop.persons]
    orgs = json.loads((tmp_path / "truth" / "organizations.json").read_text())
    assert {o["id"] for o in orgs} == set(pop.org_ids)
    assert (tmp_path / "truth" / "logins.csv").read_text().count("\n") == len(pop.logins) + 1


def test_output_does_not_depend_on_the_process_hash_seed(tmp_path: Path) -> None:
    # str hashing is salted per process; nothing we emit may depend on set/hash order
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from medblocks_sandbox.generator import *\n"
        "pop = generate_population(PopulationSpec(seed=4, persons=15))\n"
        "evolve(pop, 1)\n"
        "write_ndjson(pop, sys.argv[1])\n"
        "stream_bulk_ndjson(sys.argv[1] + '/bulk', resources=2000, seed=4)\n"
    )
    for seed in ("1", "2"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True, env=env)
    assert _digest(tmp_path / "1") == _digest(tmp_path / "2")

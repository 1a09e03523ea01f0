"""Example analyst queries (SQL files, package data); see README.md."""

from pathlib import Path

QUERIES_DIR = Path(__file__).parent


def query_files() -> dict[str, Path]:
    """Every example query by name (file stem)."""
    return {p.stem: p for p in sorted(QUERIES_DIR.glob("*.sql"))}

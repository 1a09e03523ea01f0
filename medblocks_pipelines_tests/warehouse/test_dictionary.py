"""The generated data dictionary covers every table of a built warehouse, and the committed copy in
docs/DATA_DICTIONARY.md is current."""

from pathlib import Path

import duckdb

from medblocks_pipelines.lib.warehouse.dictionary import TABLE_DOCS, data_dictionary_markdown
from medblocks_pipelines.lib.warehouse.views import load_core_views

DOC = Path(__file__).resolve().parents[2] / "docs" / "DATA_DICTIONARY.md"


def test_dictionary_documents_every_column(wh: duckdb.DuckDBPyConnection) -> None:
    md = data_dictionary_markdown(wh)
    for table in TABLE_DOCS:
        assert f"## `{table}`" in md
        for col, *_rest in wh.execute(f'DESCRIBE "{table}"').fetchall():
            assert f"| `{col}` |" in md
    for name in load_core_views(user_dir=None):
        assert f"## `{name}`" in md
    assert "## Fact matching rules" in md and "## Identity rules" in md


def test_committed_dictionary_is_current() -> None:
    doc = DOC.read_text()
    for table in TABLE_DOCS:
        assert f"## `{table}`" in doc, f"regenerate docs/DATA_DICTIONARY.md ({table} missing)"
    for name in load_core_views(user_dir=None):
        assert f"## `{name}`" in doc, f"regenerate docs/DATA_DICTIONARY.md ({name} missing)"

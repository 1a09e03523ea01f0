"""SQL on FHIR v2 ViewDefinitions compiled to DuckDB SQL.

Public API::

    compile_view(view, *, table="resources", passthrough_columns=()) -> CompiledView(sql, columns)
    run_view(con, view, *, table="resources") -> pyarrow.Table
    load_core_views() -> {name: view}      # shipped views + MEDBLOCKS_VIEWS_DIR
    run_test_suite(dir) -> report          # the official suite, standard report format
    data_dictionary(views) -> markdown
"""

from medblocks_pipelines.lib.warehouse.views.compiler import (
    CompiledView,
    OutputColumn,
    compile_view,
)
from medblocks_pipelines.lib.warehouse.views.runner import (
    PROVENANCE_COLUMNS,
    data_dictionary,
    load_core_views,
    load_views,
    run_test_case,
    run_test_suite,
    run_view,
)

__all__ = [
    "PROVENANCE_COLUMNS",
    "CompiledView",
    "OutputColumn",
    "compile_view",
    "data_dictionary",
    "load_core_views",
    "load_views",
    "run_test_case",
    "run_test_suite",
    "run_view",
]

"""The at-a-glance metadata every landing asset shows in the Dagster UI."""

from medblocks_pipelines.defs.shared.summaries import landing_metadata, summary_markdown


def test_summary_lists_types_largest_first_and_failures_by_reason() -> None:
    md = summary_markdown(
        "Pull of acme.mercy",
        {"resources": 1234, "freshness note": "x"},
        {"Observation": 1000, "Patient": 234, "Condition": 0},
        {"http_429": 3, "invalid_grant": 1},
        freshness="pulled now",
    )
    lines = md.splitlines()
    assert lines[0] == "**Pull of acme.mercy**"
    assert "- resources: **1,234**" in lines and "- freshness: pulled now" in lines
    assert lines.index("| Observation | 1,000 |") < lines.index("| Patient | 234 |")
    assert "Condition" not in md  # zero counts are left out
    assert "| http_429 | 3 |" in lines and "| invalid_grant | 1 |" in lines


def test_no_failures_says_so_and_tables_match_the_counts() -> None:
    meta = landing_metadata("Import", {"landed": 2}, {"Patient": 2}, {})
    assert "No failures." in meta["summary"].value  # type: ignore[attr-defined]
    records = meta["resources_by_type_table"].records  # type: ignore[attr-defined]
    assert [(r.data["resource_type"], r.data["count"]) for r in records] == [("Patient", 2)]
    assert meta["failures_by_reason_table"].records == []  # type: ignore[attr-defined]

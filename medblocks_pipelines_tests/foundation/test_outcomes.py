"""A run whose work failed is not green: ``fail_if_nothing_succeeded``."""

import dagster as dg
import pytest

from medblocks_pipelines.defs.shared.outcomes import fail_if_nothing_succeeded


@pytest.mark.parametrize(
    ("attempted", "failed", "red"),
    [
        (3, 3, True),  # every unit failed: the run fails
        (1, 1, True),  # the single unit failed
        (3, 2, False),  # partial: green, the metadata counts the failures
        (0, 0, False),  # nothing asked: not a failure (the asset says so)
        (2, 0, False),  # all good
    ],
)
def test_fail_if_nothing_succeeded(attempted: int, failed: int, red: bool) -> None:
    if red:
        with pytest.raises(dg.Failure, match=f"every query failed \\({failed} of {attempted}\\)"):
            fail_if_nothing_succeeded(attempted=attempted, failed=failed, what="query")
    else:
        fail_if_nothing_succeeded(attempted=attempted, failed=failed, what="query")


def test_a_failure_makes_the_run_red() -> None:
    @dg.asset
    def all_failed() -> None:
        fail_if_nothing_succeeded(attempted=2, failed=2, what="query", metadata={"queries": 2})

    with dg.instance_for_test() as instance:
        result = dg.materialize([all_failed], instance=instance, raise_on_error=False)
    assert not result.success

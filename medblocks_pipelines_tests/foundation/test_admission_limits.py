"""Which instance run limit a new CLI run would exceed (``cli.admission.blocking_limit``), read from
the instance's own ``concurrency.runs`` settings."""

import uuid

import dagster as dg
import pytest

from medblocks_pipelines.cli.admission import blocking_limit

CONCURRENCY = {
    "runs": {
        "max_concurrent_runs": 3,
        "tag_concurrency_limits": [
            {"key": "medblocks/source", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
            {"key": "medblocks/tenant", "value": "big", "limit": 2},
            {"key": "medblocks/export", "limit": 1},
        ],
    }
}


@dg.op
def _noop() -> None:
    return None


@dg.job
def _job() -> None:
    _noop()


def _add(instance: dg.DagsterInstance, status: dg.DagsterRunStatus, **tags: str) -> None:
    instance.create_run_for_job(
        _job,
        run_id=str(uuid.uuid4()),
        tags={f"medblocks/{k}": v for k, v in tags.items()},
        status=status,
    )


@pytest.mark.parametrize(
    ("existing", "new", "blocked_by"),
    [
        # per unique value: another source is free, the same source is not
        ([{"source": "a"}], {"source": "b"}, None),
        ([{"source": "a"}], {"source": "a"}, "medblocks/source=a"),
        # a limit on one value only applies to that value
        ([{"tenant": "big"}] * 2, {"tenant": "small"}, None),
        ([{"tenant": "big"}] * 2, {"tenant": "big"}, "medblocks/tenant=big"),
        # a key without a value counts every run carrying the key
        ([{"export": "x"}], {"export": "y"}, "medblocks/export=y"),
        # max_concurrent_runs counts every in-progress run
        ([{}] * 3, {}, "max_concurrent_runs 3"),
    ],
)
def test_blocking_limit(
    existing: list[dict[str, str]], new: dict[str, str], blocked_by: str | None
) -> None:
    with dg.instance_for_test(overrides={"concurrency": CONCURRENCY}) as instance:
        for tags in existing:
            _add(instance, dg.DagsterRunStatus.STARTED, **tags)
        # ended runs hold no slot
        for status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.CANCELED):
            _add(instance, status, source="a", tenant="big", export="x")
        reason = blocking_limit(instance, {f"medblocks/{k}": v for k, v in new.items()})
    if blocked_by is None:
        assert reason is None
    else:
        assert reason is not None and blocked_by in reason

"""The platform's own jobs (``ndjson_import_job``, ``tenant_warehouse_job``) on the Celery executor.

Celery workers rebuild the job from this module (``dg.reconstructable``), so it lives at module
level. The queue name comes from the environment so a test run never shares a queue.
"""

import os

import dagster as dg
from dagster_celery import celery_executor

from medblocks_pipelines.defs.shared.import_assets import ndjson_import, ndjson_import_job
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.warehouse.assets import tenant_warehouse, tenant_warehouse_job


def celery_config() -> dict[str, object]:
    """The executor config, read from the environment when the job is built (the test sets a
    unique queue before that); the worker is started with the same block (``-y``)."""
    broker = os.environ.get("MEDBLOCKS_CELERY_BROKER", "pyamqp://guest:guest@127.0.0.1:5672//")
    queue = os.environ.get("MEDBLOCKS_CELERY_QUEUE", "dagster")
    return {"broker": broker, "backend": "rpc://", "config_source": {"task_default_queue": queue}}


def definitions(executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """The two jobs with ``executor`` (Celery unless told otherwise)."""
    return dg.Definitions(
        assets=[ndjson_import, tenant_warehouse],
        jobs=[ndjson_import_job, tenant_warehouse_job],
        resources={"platform": PlatformResource()},
        executor=executor or celery_executor.configured(celery_config()),
    )


def celery_import_job() -> dg.JobDefinition:
    """``ndjson_import_job`` on Celery."""
    return definitions().resolve_job_def("ndjson_import_job")


def celery_warehouse_job() -> dg.JobDefinition:
    """``tenant_warehouse_job`` on Celery."""
    return definitions().resolve_job_def("tenant_warehouse_job")

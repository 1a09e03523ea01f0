"""Webhook delivery from the outbox, on the Dagster daemon (never inside a web request).

Each tick fans new outbox events out to the tenants' endpoints and attempts the deliveries that are
due (``medblocks_pipelines.lib.ops.webhooks.deliver_due``), as a bounded tick: at most
``MEDBLOCKS_WEBHOOK_BATCH`` (100) deliveries, ``WORKERS`` POSTs in parallel, and no round started
that could end after ``MEDBLOCKS_WEBHOOK_DEADLINE_S`` (20 s), well under the daemon's 60 s sensor
timeout, whatever the receivers do. What a tick leaves is still due at the next tick (5 s later).
The state lives in the control plane, not in the sensor cursor, so a crashed tick or a restarted
daemon loses nothing.

Why not a delivery job: a run per 5 s tick would bury the UI's runs and add a run's start-up per
delivery; the tick's work is small and bounded, and every attempt is recorded in the control plane.
"""

import dagster as dg
import httpx

from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.ops.webhooks import DeliveryPolicy, deliver_due
from medblocks_pipelines.lib.registry import utcnow
from medblocks_pipelines.lib.settings import Tuning

#: Parallel POSTs per round: a few slow receivers do not hold up the others.
WORKERS = 4
#: Seconds one POST may take (connect, write, each read).
TIMEOUT_S = 10.0


def tick_policy() -> DeliveryPolicy:
    """The sensor's bounds: a tick must finish well within the daemon's sensor timeout (60 s)."""
    tuning = Tuning.from_env()  # MEDBLOCKS_WEBHOOK_BATCH, _TIMEOUT_S, _DEADLINE_S
    timeout = tuning.webhook_timeout_s
    return DeliveryPolicy(
        batch=tuning.webhook_batch,
        timeout_s=min(TIMEOUT_S, TIMEOUT_S if timeout is None else timeout),
        workers=WORKERS,
        deadline_s=tuning.webhook_deadline_s,
    )


@dg.sensor(
    name="webhook_delivery_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Delivers outbox events (connection, sync, export, network, webhook facts) to "
    "tenants' webhook endpoints per Standard Webhooks, retrying on a schedule over ~28 hours and "
    "disabling endpoints that keep failing. Every attempt is recorded in webhook_attempts.",
)
def webhook_delivery_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SkipReason:
    """Fan out new events and attempt due deliveries; the tick reports counts only."""
    policy = tick_policy()
    with httpx.Client(follow_redirects=False) as http:
        report = deliver_due(platform.control_plane, now=utcnow(), http=http, policy=policy)
    md = report.as_metadata()
    context.log.info("webhooks: " + ", ".join(f"{k}={v}" for k, v in md.items()))
    # Deliveries are side effects, not runs: the tick always ends as a skip with the counts.
    return dg.SkipReason(
        f"{md['succeeded']} delivered, {md['failed_attempts']} failed attempts, "
        f"{md['new_deliveries']} new, {md['disabled_endpoints']} endpoints disabled, "
        f"{md['deferred']} left for the next tick, {md['abandoned']} still running at the deadline"
    )

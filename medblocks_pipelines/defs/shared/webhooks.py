"""Webhook delivery from the outbox, on the Dagster daemon (never inside a web request).

Each tick fans new outbox events out to the tenants' endpoints and attempts the deliveries that are
due (``medblocks_pipelines.lib.ops.webhooks.deliver_due``). The state lives in the control plane,
not in the sensor cursor, so a crashed tick or a restarted daemon loses nothing.
"""

import os

import dagster as dg
import httpx

from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.ops.webhooks import DeliveryPolicy, deliver_due
from medblocks_pipelines.lib.registry import utcnow


def _batch() -> int:
    # A tick must finish well within the daemon's sensor timeout (60 s by default).
    try:
        return int(os.environ.get("MEDBLOCKS_WEBHOOK_BATCH", "100"))
    except ValueError:
        return 100


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
    policy = DeliveryPolicy(batch=_batch(), timeout_s=10.0)
    with httpx.Client(follow_redirects=False) as http:
        report = deliver_due(platform.control_plane, now=utcnow(), http=http, policy=policy)
    md = report.as_metadata()
    context.log.info("webhooks: " + ", ".join(f"{k}={v}" for k, v in md.items()))
    # Deliveries are side effects, not runs: the tick always ends as a skip with the counts.
    return dg.SkipReason(
        f"{md['succeeded']} delivered, {md['failed_attempts']} failed attempts, "
        f"{md['new_deliveries']} new, {md['disabled_endpoints']} endpoints disabled"
    )

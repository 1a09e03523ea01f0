"""The outcome row of an allowed network query that did not fully succeed (see
:func:`audit_outcome`)."""

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

if TYPE_CHECKING:
    from medblocks_pipelines.lib.network.query import QueryResult

__all__ = ["OUTCOME_ACTION", "audit_outcome", "fail_and_audit", "settle_status"]


#: The action of the follow-up audit row of an allowed query that did not fully succeed.
OUTCOME_ACTION = "network.query.outcome"


def audit_outcome(
    cp: "ControlPlane",
    *,
    tenant: str,
    actor: str,
    person: str,
    result: "QueryResult",
    query_id: int,
    error: str | None = None,
    sent: bool = True,
) -> None:
    """Append the outcome of an allowed query that failed or only partly succeeded.

    The audit log is append-only: the ``allowed`` decision row stays as it was written, and a
    second row (action ``network.query.outcome``, the same tenant, actor, person and purpose,
    ``evidence.audit_id`` pointing at the decision row) says what happened: ``failed before
    sending: <error class>``, ``failed: <error class>``, or ``failed``/``partial`` with each
    gateway's status. A success adds no row (the decision row's responders and documents say
    what came back). Gateway ids and error classes only: no patient data.
    """
    if result.status == "success" and error is None:
        return
    not_ok = {
        g: st for g, st in sorted(result.gateway_status.items()) if st not in ("ok", "no_match")
    }
    if error is not None:
        reason = f"failed{'' if sent else ' before sending'}: {error}"
    else:
        statuses = ", ".join(f"{g} {st}" for g, st in not_ok.items())
        reason = f"{result.status}: {statuses}" if statuses else result.status
    cp.audit(
        tenant_id=tenant,
        actor=actor,
        action=OUTCOME_ACTION,
        decision="allowed",
        person_id=person,
        purpose=result.purpose,
        reason=reason,
        evidence={
            "audit_id": result.audit_id,
            "query_id": query_id,
            "outcome": result.status,
            "error": error,
            "sent": sent,
            "gateway_status": dict(sorted(result.gateway_status.items())),
        },
        gateways=list(result.gateways),
        responders=list(result.responders),
    )


def settle_status(result: "QueryResult", statuses: Iterable[str]) -> None:
    """``success`` when every responder answered ok/no_match, else ``partial`` when some
    responded, else ``failed`` (IHE gateways and Facilitated FHIR nodes alike)."""
    statuses = list(statuses)
    good = sum(st in ("ok", "no_match") for st in statuses)
    result.status = (
        "success" if good == len(statuses) else "partial" if result.responders else "failed"
    )


def fail_and_audit(
    cp: "ControlPlane",
    finish: Callable[[str], None],
    *,
    tenant: str,
    actor: str,
    person: str,
    result: "QueryResult",
    query_id: int,
    error: str,
    sent: bool,
) -> None:
    """An allowed query raised: mark it failed, ``finish(error)`` its records, and append its
    outcome row even when finishing fails."""
    result.status = "failed"
    try:
        finish(error)
    finally:
        audit_outcome(
            cp,
            tenant=tenant,
            actor=actor,
            person=person,
            result=result,
            query_id=query_id,
            error=error,
            sent=sent,
        )

"""Hook calls answered on the event loop (issue 17) keep every check of the threaded path.

``CdsService.call_async`` answers ``patient-view`` inline when nothing has to wait, and hands the
call to a thread (``offload``) where it must: these tests count the hand-offs, and check that the
answer, the jti replay refusal and the refusal's audit row are the same either way.
"""

import asyncio
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool

from medblocks_pipelines.lib.cds.inline import MustOffload, inline_mode, may_block
from medblocks_pipelines.lib.cds.jti_store import RedisJtiStore, SqlJtiStore
from medblocks_pipelines.lib.cds.security import CdsAuthenticator
from medblocks_pipelines.lib.cds.service import CdsService
from medblocks_pipelines.lib.errors import CdsRequestError
from medblocks_pipelines.lib.registry.schema import audit_log
from medblocks_pipelines.lib.warehouse.build import warehouse_path
from medblocks_pipelines_tests.clinician_workflow.conftest import TODAY, order_select, patient_view
from medblocks_pipelines_tests.clinician_workflow.test_cds_workers import REDIS_URL, _redis

PV = "medblocks-patient-view"


def test_may_block_refuses_only_in_inline_mode() -> None:
    may_block("anything")  # a thread may block
    with inline_mode(), pytest.raises(MustOffload):
        may_block("registry")
    may_block("anything")  # the mode ends with the block


class Offloads:
    """``offload`` for the service: runs in a thread, and records what had to go there."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.names.append(fn.__name__)
        return await run_in_threadpool(fn, *args)


@pytest.fixture
def service(cds_env: Any) -> Iterator[CdsService]:
    store = RedisJtiStore(
        _redis(),
        prefix=f"test:jti:{secrets.token_hex(4)}:",
        url=REDIS_URL,
    )
    svc = CdsService(
        cds_env.cp,
        public_base_url=cds_env.web,
        warehouse_path_of=lambda tenant: warehouse_path(cds_env.settings, tenant),
        http=cds_env.http,
        authenticator=CdsAuthenticator(cds_env.cp, http=cds_env.http, jti_store=store),
        today=lambda: TODAY,
    )
    yield svc
    svc.close()


def _call(svc: CdsService, token: str, body: dict[str, Any], offload: Offloads) -> Any:
    import json

    return asyncio.run(
        svc.call_async(PV, f"Bearer {token}", json.dumps(body).encode(), offload=offload)
    )


def _summaries(answer: dict[str, Any]) -> list[str]:
    return sorted(c["summary"] for c in answer["cards"])


def test_patient_view_inline_answers_as_the_thread_does(cds_env: Any, service: Any) -> None:
    import json

    url = service.service_url(PV)
    cold = Offloads()
    first = _call(service, cds_env.sign(url), patient_view("a1"), cold)
    # Cold caches (registry, JWKS fetch, warehouse index) must be read in a thread, not inline.
    assert cold.names == ["call"]
    warm = Offloads()
    inline = _call(service, cds_env.sign(url), patient_view("a1"), warm)
    assert warm.names == []  # warm: answered on the event loop
    threaded = service.call(
        PV, f"Bearer {cds_env.sign(url)}", json.dumps(patient_view("a1")).encode()
    )
    assert _summaries(inline) == _summaries(threaded) == _summaries(first)
    assert inline["cards"]  # a1 has records elsewhere: the comparison is not of two empty lists


def test_a_replayed_jti_is_refused_inline_and_in_a_thread_and_audited(
    cds_env: Any, service: Any
) -> None:
    import json

    url = service.service_url(PV)
    _call(service, cds_env.sign(url), patient_view("a1"), Offloads())  # warm the caches
    token = cds_env.sign(url)
    assert "cards" in _call(service, token, patient_view("a1"), Offloads())
    offloads = Offloads()
    with pytest.raises(CdsRequestError) as err:
        _call(service, token, patient_view("a1"), offloads)
    assert err.value.reason == "replayed_jti"
    assert offloads.names == ["_audit_refusal"]  # the audit row is written, in a thread
    with pytest.raises(CdsRequestError) as err:
        service.call(PV, f"Bearer {token}", json.dumps(patient_view("a1")).encode())
    assert err.value.reason == "replayed_jti"
    with cds_env.cp.engine.connect() as conn:
        refused = conn.execute(
            sa.select(sa.func.count())
            .select_from(audit_log)
            .where(audit_log.c.action == "cds.authenticate", audit_log.c.reason == "replayed_jti")
        ).scalar_one()
    assert refused == 2


def test_a_call_that_must_wait_spends_its_jti_once(cds_env: Any, service: Any) -> None:
    """Cold caches: verification goes to a thread before the jti is remembered, so the call
    succeeds there (a jti remembered inline first would be refused as a replay)."""
    url = service.service_url(PV)
    offloads = Offloads()
    token = cds_env.sign(url)
    assert "cards" in _call(service, token, patient_view("a1"), offloads)
    assert offloads.names == ["call"]
    with pytest.raises(CdsRequestError) as err:
        _call(service, token, patient_view("a1"), Offloads())
    assert err.value.reason == "replayed_jti"


def test_order_hooks_and_the_sql_jti_store_stay_in_a_thread(cds_env: Any, service: Any) -> None:
    import json

    url = service.service_url("medblocks-order-select")
    order = {"resourceType": "ServiceRequest", "id": "o1", "status": "draft", "intent": "order"}
    offloads = Offloads()
    asyncio.run(
        service.call_async(
            "medblocks-order-select",
            f"Bearer {cds_env.sign(url)}",
            json.dumps(order_select([order])).encode(),
            offload=offloads,
        )
    )
    assert offloads.names == ["call"]  # an order check may ask a terminology server
    sql = CdsAuthenticator(cds_env.cp, http=cds_env.http, jti_store=SqlJtiStore(cds_env.cp.engine))
    with pytest.raises(MustOffload):  # the cds_jti table: a blocking transaction
        asyncio.run(sql.verify_async("Bearer x", url=url, offload=Offloads()))


def test_many_calls_in_flight_on_one_loop_wait_for_a_redis_connection(
    cds_env: Any, service: Any
) -> None:
    """More calls in flight than the asyncio pool has connections: each waits for one (the
    default pool refused the 101st with a 503)."""
    import json

    url = service.service_url(PV)
    _call(service, cds_env.sign(url), patient_view("a1"), Offloads())  # warm the caches
    n = 150
    tokens = [cds_env.sign(url) for _ in range(n)]
    raw = json.dumps(patient_view("a1")).encode()

    async def all_at_once() -> list[Any]:
        offload = Offloads()
        calls = [service.call_async(PV, f"Bearer {t}", raw, offload=offload) for t in tokens]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(all_at_once())
    assert [a for a in answers if not isinstance(a, dict)] == []
    assert len(answers) == n


def test_an_unreachable_redis_fails_closed_inline(cds_env: Any, service: Any) -> None:
    import redis

    from medblocks_pipelines_tests.clinician_workflow.test_cds_workers import socket_closed_port

    url = service.service_url(PV)
    _call(service, cds_env.sign(url), patient_view("a1"), Offloads())  # warm the caches
    with socket_closed_port() as port:
        down = f"redis://127.0.0.1:{port}/0"
        service.auth.jtis = RedisJtiStore(redis.Redis.from_url(down), url=down)
        with pytest.raises(CdsRequestError) as err:
            _call(service, cds_env.sign(url), patient_view("a1"), Offloads())
    assert err.value.status == 503 and err.value.reason == "jti_unavailable"

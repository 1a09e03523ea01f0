"""An allowed network query that then fails says so in the audit log.

The decision row (``network.query``, ``allowed``) is written before anything is sent and is never
rewritten; a query that fails before sending (no demographics), fails while sending (the sandbox
gateway is down) or only partly succeeds gets a second, appended ``network.query.outcome`` row
pointing at it. A successful query adds none.
"""

from typing import Any

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.network.outcome import OUTCOME_ACTION
from medblocks_pipelines.lib.network.query import run_network_query
from medblocks_pipelines.lib.network.tables import network_queries
from medblocks_pipelines.lib.registry.rows import AuditEntry
from medblocks_pipelines_tests.network.conftest import LiveServer
from medblocks_pipelines_tests.network.test_query import PERSON, Env
from medblocks_sandbox.gateway import Behaviour, create_gateway_app, network_source_config


@pytest.fixture
def env(
    tmp_path: Any, population: Any, signing_identity: tuple[bytes, bytes], gateway_server: Any
) -> Env:
    return Env(tmp_path, population, signing_identity, gateway_server)


def _rows(env: Env) -> list[AuditEntry]:
    return list(reversed(env.cp.list_audit(tenant_id="acme")))  # oldest first


def _point_network_at(env: Env, url: str) -> None:
    cfg = network_source_config(url, env.population, timeout_s=2.0)
    cfg["signing_key_secret"] = "network/sandbox-qhin/key"
    cfg["signing_cert_secret"] = "network/sandbox-qhin/cert"
    env.cp.add_source(
        "sandbox-qhin", "Sandbox QHIN", "sandbox", "network", None, ["network"], config=cfg
    )


def test_gateway_down_records_the_failure(env: Env, population: Any) -> None:
    env.start()  # stores the signing identity and a network source
    down = LiveServer(create_gateway_app(population)).__enter__()
    down.__exit__()  # the sandbox gateway is down: nothing listens on its port any more
    _point_network_at(env, down.url)
    env.launch()
    result = env.query()
    assert result.allowed and result.status == "failed", result
    decision, outcome = _rows(env)
    assert (decision.action, decision.decision) == ("network.query", "allowed")
    assert decision.responders == []
    assert outcome.action == OUTCOME_ACTION
    assert outcome.evidence["audit_id"] == decision.id == result.audit_id
    assert outcome.evidence["outcome"] == "failed"
    assert outcome.reason.startswith("failed: ")
    for gateway in ("riverside-health", "valley-medical"):
        assert f"{gateway} " in outcome.reason, outcome.reason
        assert outcome.evidence["gateway_status"][gateway] not in ("ok", "no_match")
    assert (outcome.person_id, outcome.purpose, outcome.actor) == (
        PERSON,
        "T-TREAT",
        "dr-house",
    )
    with env.cp.engine.connect() as c:
        assert c.execute(sa.select(network_queries.c.status)).scalar_one() == "failed"


def test_failure_before_sending_is_recorded(env: Env) -> None:
    gw = env.start()
    env.launch()
    with pytest.raises(ConfigError, match="no demographics"):
        # No demographics given, no warehouse and no lake: nothing can be sent.
        run_network_query(
            env.cp, env.settings, tenant="acme", person=PERSON, purpose="T-TREAT", actor="dr-house"
        )
    assert gw.seen == []
    decision, outcome = _rows(env)
    assert decision.decision == "allowed" and decision.action == "network.query"
    assert outcome.action == OUTCOME_ACTION
    assert outcome.reason == "failed before sending: ConfigError"
    assert outcome.evidence["sent"] is False
    assert outcome.evidence["audit_id"] == decision.id


def test_partial_success_is_recorded_and_success_adds_nothing(env: Env) -> None:
    env.start({"valley-medical": Behaviour(delay_s=1.5)}, timeout_s=0.4)
    env.launch()
    result = env.query()
    assert result.status == "partial", result
    rows = _rows(env)
    assert [r.action for r in rows] == ["network.query", OUTCOME_ACTION]
    assert rows[1].reason.startswith("partial: valley-medical ")
    assert rows[1].responders == ["riverside-health"]


def test_success_adds_no_outcome_row(env: Env) -> None:
    env.start()
    env.launch()
    assert env.query().status == "success"
    assert [r.action for r in _rows(env)] == ["network.query"]

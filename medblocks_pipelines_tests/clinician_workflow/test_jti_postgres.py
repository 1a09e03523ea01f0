"""jti replay refusal holds on PostgreSQL too, and across two authenticators (two processes'
worth of caches): the database primary key decides, not process memory."""

import time
import uuid

import jwt
import pytest
from cryptography.fernet import Fernet

from medblocks_pipelines.lib.cds.security import CdsAuthenticator
from medblocks_pipelines.lib.errors import CdsRequestError
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.smart.assertion import generate_signing_key


def test_replay_refused_across_authenticators_on_postgres(
    pg_database_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", pg_database_url)
    monkeypatch.setenv("MEDBLOCKS_SECRET_KEY", Fernet.generate_key().decode())
    settings = get_settings()
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    key = generate_signing_key("RS384", kid="pg")
    tenant = f"t{uuid.uuid4().hex[:8]}"
    cp.add_tenant(tenant, "T")
    cp.add_source(
        f"{tenant}-src", "S", "sandbox", "ehr", "http://s.example/fhir", ["clinician_workflow"]
    )
    iss = f"https://{tenant}.example"
    cp.add_organization(
        f"{tenant}-org",
        tenant,
        f"{tenant}-src",
        "O",
        config={"cds": {"iss": iss, "jwks": {"keys": [key.public_jwk()]}}},
    )
    url = "http://us.example/cds-services/medblocks-patient-view"
    now = int(time.time())
    token = jwt.encode(
        {"iss": iss, "aud": url, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())},
        key.private_pem,
        algorithm="RS384",
        headers={"kid": "pg", "typ": "JWT"},
    )
    first, second = CdsAuthenticator(cp), CdsAuthenticator(cp)
    assert first.verify(f"Bearer {token}", url=url).tenant_id == tenant
    with pytest.raises(CdsRequestError) as err:
        second.verify(f"Bearer {token}", url=url)
    assert err.value.reason == "replayed_jti" and err.value.status == 401
    cp.engine.dispose()

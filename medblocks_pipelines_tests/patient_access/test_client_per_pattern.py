"""One EHR, several app registrations: ``<pattern>_client_id`` wins over ``client_id`` so the
patient-facing app, the EHR-launched app and the backend client of one source never share a client."""

import pytest

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.smart.tokens import ClientAuth
from medblocks_pipelines_tests.support.rows import source_row

SOURCE = source_row(
    id="mercy",
    config={"client_id": "patient-app", "clinician_workflow_client_id": "ehr-launch-app"},
)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("patient_access", "patient-app"),  # no specific registration: the default one
        ("clinician_workflow", "ehr-launch-app"),  # its own registration
        (None, "patient-app"),  # callers that do not say
    ],
)
def test_client_id_by_pattern(pattern: str | None, expected: str) -> None:
    assert ClientAuth.from_source(SOURCE, None, pattern=pattern).client_id == expected  # type: ignore[arg-type]


def test_no_client_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ClientAuth.from_source(source_row(id="x"), None, pattern="patient_access")  # type: ignore[arg-type]

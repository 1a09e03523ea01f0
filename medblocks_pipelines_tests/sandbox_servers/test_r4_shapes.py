"""What the sandbox EHR sends validates against the FHIR R4 models (fhir.resources R4B).

CapabilityStatement, searchset and history Bundles, and OperationOutcome errors are parsed with
the R4B classes; a model error fails the test.
"""

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    Server,
    register_public,
    standalone_token,
)


def test_capability_statement_validates(ehr: Server) -> None:
    cs = CapabilityStatement.model_validate(ehr.http.get(f"{ehr.fhir}/metadata").json())
    assert cs.fhirVersion == "4.0.1"


def test_bundles_and_outcomes_validate(ehr: Server) -> None:
    register_public(ehr)
    auth = {"Authorization": f"Bearer {standalone_token(ehr)['access_token']}"}
    for path in (
        "Observation?_count=2&category=laboratory",
        "MedicationRequest?_include=MedicationRequest:medication",
        "Patient/p1/$everything?_count=5",
        "Observation/a1c-0/_history",
    ):
        bundle = Bundle.model_validate(ehr.http.get(f"{ehr.fhir}/{path}", headers=auth).json())
        assert bundle.entry
    for path in ("Observation?bogus=1", "Observation/none", "Patient/p2"):
        OperationOutcome.model_validate(ehr.http.get(f"{ehr.fhir}/{path}", headers=auth).json())

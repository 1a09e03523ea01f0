"""The network pattern: exchange-network queries (TEFCA QTF: XCPD, XCA; Facilitated FHIR) under a
permitted purpose.

- :mod:`~.policy` + ``purposes/xp-v*.yaml``: purpose-of-use rules, evaluated before anything is sent
- :mod:`~.ihe`: SOAP 1.2 / WS-Addressing / XUA SAML, XCPD ITI-55, XCA ITI-38/ITI-39, MTOM
- :mod:`~.client`: async fan-out over responding gateways (timeouts, partial results, retries)
- :mod:`~.ccda`: C-CDA R2.1 to FHIR R4
- :mod:`~.query`: :func:`~.query.run_network_query`, shared by the CLI and the Dagster asset; its
  steps in :mod:`~.evidence`, :mod:`~.config`, :mod:`~.demographics`, :mod:`~.landing`
- :mod:`~.udap`: UDAP Security 2.0 client (discovery, registration, B2B tokens, certificates)
- :mod:`~.facilitated` + :mod:`~.fhir_nodes`: TEFCA Facilitated FHIR query (directory, $match,
  US Core, parallel per-node deadline), under the same policy and audit
- :mod:`~.tables`: document registry, query records, relationship events
- :mod:`~.safexml`: the hardened parser every untrusted byte goes through
"""

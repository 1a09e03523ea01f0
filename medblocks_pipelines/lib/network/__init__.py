"""The network pattern: exchange-network queries (TEFCA QTF: XCPD, XCA) under a permitted purpose.

- :mod:`~.policy` + ``purposes/xp-v*.yaml``: purpose-of-use rules, evaluated before anything is sent
- :mod:`~.ihe`: SOAP 1.2 / WS-Addressing / XUA SAML, XCPD ITI-55, XCA ITI-38/ITI-39, MTOM
- :mod:`~.client`: async fan-out over responding gateways (timeouts, partial results, retries)
- :mod:`~.ccda`: C-CDA R2.1 to FHIR R4
- :mod:`~.query`: :func:`~.query.run_network_query`, shared by the CLI and the Dagster asset
- :mod:`~.tables`: document registry, query records, relationship events
- :mod:`~.safexml`: the hardened parser every untrusted byte goes through
"""

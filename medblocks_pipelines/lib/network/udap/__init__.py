"""UDAP client (HL7 FAST Security for Scalable Registration, Authentication and Authorization 2.0).

- :mod:`~.certs`: our certificate and key in the vault, chain validation, CRL revocation, CSR
- :mod:`~.discovery`: ``/.well-known/udap`` with verified ``signed_metadata``
- :mod:`~.registration`: trusted dynamic client registration (register, update, cancel), storage
- :mod:`~.token`: B2B ``client_credentials`` tokens with ``hl7-b2b`` / ``tefca_ias`` extensions
- :mod:`~.authcode`: ``authorization_code`` + PKCE for consumer-facing apps (IAS Mode 1)
- :mod:`~.session`: one object per network that discovers, registers and gets tokens per node

The Facilitated FHIR query that uses them is :mod:`medblocks_pipelines.lib.network.facilitated`.
"""

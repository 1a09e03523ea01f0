"""Names the responding gateway reads and writes, taken from the specifications themselves.

SOAP 1.2 and WS-Addressing 1.0 (W3C), WS-Security 1.0 and SAML 2.0 (OASIS), ebXML RegRep 3.0,
IHE ITI TF-2 (ITI-55 XCPD, ITI-38/39 XCA, XDS metadata UUIDs) and the TEFCA purpose-of-use code
system. Kept apart from the product's client on purpose: a name one side gets wrong then shows
as a failed exchange instead of two halves agreeing on the same mistake.
"""

SOAP = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
HL7 = "urn:hl7-org:v3"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XOP = "http://www.w3.org/2004/08/xop/include"

# IHE ITI TF-2b 3.55.5 / TF-2b 3.38.5 / TF-2b 3.39.5 (WS-Addressing actions).
ACTION_XCPD = "urn:hl7-org:v3:PRPA_IN201305UV02:CrossGatewayPatientDiscovery"
ACTION_XCPD_RESPONSE = "urn:hl7-org:v3:PRPA_IN201306UV02:CrossGatewayPatientDiscovery"
ACTION_XCA_QUERY = "urn:ihe:iti:2007:CrossGatewayQuery"
ACTION_XCA_QUERY_RESPONSE = "urn:ihe:iti:2007:CrossGatewayQueryResponse"
ACTION_XCA_RETRIEVE = "urn:ihe:iti:2007:CrossGatewayRetrieve"
ACTION_XCA_RETRIEVE_RESPONSE = "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"

# IHE ITI TF-3 4.2.5 (stored query ids, entry types) and ebRS 3.0 status codes.
FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
STABLE_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
ON_DEMAND_ENTRY = "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"
STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
RESPONSE_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
RESPONSE_PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
RESPONSE_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
EI_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
EI_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
CL_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
CL_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
CL_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"

# TEFCA SOP Exchange Purposes: the XP code system and the SAML attribute that carries it.
XP_CODE_SYSTEM = "2.16.840.1.113883.3.7204.1.5.2.1"
ATTR_PURPOSE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"

"""Codes and concepts for matching: systems by canonical URI (OIDs mapped), ICD-10 without dots,
codings connected into concepts when one CodeableConcept carries them together, and vaccine
families that let a claim's CPT meet a record's CVX."""

import polars as pl

_OID_SYSTEMS = {
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
    "http://www.ama-assn.org/go/cpt/": "http://www.ama-assn.org/go/cpt",
    "urn:oid:2.16.840.1.113883.6.285": "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": (
        "https://bluebutton.cms.gov/resources/codesystem/hcpcs"
    ),
}

# Vaccine families: CVX codes (CDC) and the CPT codes of the vaccine products (CDC CPT-CVX mapping)
# grouped so that a claim line meets the clinical record. Influenza products are many; a claim and a
# record of "an influenza vaccine on that day" are one fact.
_CVX = "http://hl7.org/fhir/sid/cvx"
_CPT = "http://www.ama-assn.org/go/cpt"
VACCINE_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "influenza": (
        (
            "88",
            "135",
            "140",
            "141",
            "144",
            "149",
            "150",
            "153",
            "155",
            "158",
            "161",
            "166",
            "168",
            "171",
            "185",
            "186",
            "197",
            "205",
        ),
        (
            "90630",
            "90653",
            "90654",
            "90655",
            "90656",
            "90657",
            "90658",
            "90660",
            "90661",
            "90662",
            "90672",
            "90673",
            "90674",
            "90682",
            "90685",
            "90686",
            "90687",
            "90688",
            "90689",
            "90694",
            "90756",
        ),
    ),
    "tdap": (("115",), ("90715",)),
    "td": (("09", "113", "138", "139"), ("90714", "90718")),
    "pneumococcal-conjugate": (("133", "152", "215", "216"), ("90670", "90671", "90677")),
    "pneumococcal-polysaccharide": (("33", "109"), ("90732",)),
    "zoster": (("121", "187", "188"), ("90736", "90750")),
    "hepatitis-b": (
        ("08", "43", "44", "45", "189"),
        ("90739", "90740", "90743", "90744", "90746", "90747"),
    ),
    "hpv": (("62", "118", "137", "165"), ("90649", "90650", "90651")),
    "mmr": (("03",), ("90707",)),
    "varicella": (("21",), ("90716",)),
    "covid-19": (
        (
            "207",
            "208",
            "210",
            "211",
            "212",
            "213",
            "217",
            "218",
            "219",
            "221",
            "228",
            "229",
            "300",
            "301",
            "302",
            "309",
            "310",
            "311",
            "312",
            "313",
        ),
        ("91300", "91301", "91303", "91304", "91318", "91319", "91320", "91321", "91322"),
    ),
}


def _vaccine_group_of() -> dict[str, str]:
    out: dict[str, str] = {}
    for group, (cvx, cpt) in VACCINE_GROUPS.items():
        for c in cvx:
            out[f"{_CVX}|{c}"] = f"vaccine-group|{group}"
        for c in cpt:
            out[f"{_CPT}|{c}"] = f"vaccine-group|{group}"
    return out


VACCINE_GROUP_OF = _vaccine_group_of()


# --------------------------------------------------------------------------------------------
# codes and concepts


def norm_system(system: pl.Expr) -> pl.Expr:
    """Code systems by canonical URI (OIDs and known aliases mapped)."""
    return system.replace(_OID_SYSTEMS)


def _norm_code(system: pl.Expr, code: pl.Expr) -> pl.Expr:
    # ICD-10 codes arrive with and without the dot (E11.9 / E119)
    icd = system.str.contains("icd-10")
    code = code.str.strip_chars()
    return (
        pl.when(icd)
        .then(code.str.replace_all(".", "", literal=True).str.to_uppercase())
        .otherwise(code)
    )


def codes_long(mentions: pl.DataFrame) -> pl.DataFrame:
    """One row per (mention, CodeableConcept index, coding) with normalised ``system|code``."""
    df = (
        mentions.select("mention_id", "kind", "concept_codings")
        .explode("concept_codings")
        .with_columns(cc_idx=pl.int_range(pl.len()).over("mention_id"))
        .explode("concept_codings")
        .unnest("concept_codings")
        .filter(pl.col("code").is_not_null() & pl.col("system").is_not_null())
    )
    system = norm_system(pl.col("system"))
    df = df.with_columns(system=system).with_columns(
        code=_norm_code(pl.col("system"), pl.col("code"))
    )
    return df.with_columns(sc=pl.col("system") + "|" + pl.col("code"))


def concept_map(codes: pl.DataFrame) -> dict[str, str]:
    """code -> concept id: codes sharing a CodeableConcept are connected; vaccine groups join in."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra

    # claim-line codes never join codes together: a line holds one service
    groups = (
        codes.group_by("kind", "mention_id", "cc_idx")
        .agg(pl.col("sc").unique().sort())
        .filter(pl.col("sc").list.len() > 1)
        .select(pl.col("kind") + "#" + pl.col("sc").list.join("\t"))
        .unique()
        .to_series()
        .to_list()
    )
    for sc in codes.select(pl.col("kind") + "#" + pl.col("sc")).unique().to_series().to_list():
        find(sc)
    for g in groups:
        kind, members = g.split("#", 1)
        items = members.split("\t")
        for other in items[1:]:
            union(f"{kind}#{items[0]}", f"{kind}#{other}")
    for sc, group in VACCINE_GROUP_OF.items():
        key = f"immunization#{sc}"
        if key in parent:
            union(key, f"immunization#{group}")
    return {k: find(k) for k in list(parent)}

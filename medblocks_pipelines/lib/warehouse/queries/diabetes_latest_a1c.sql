-- Persons with diabetes (SNOMED 44054006 or ICD-10-CM E10-E11 in any source) and their latest
-- hemoglobin A1c (LOINC 4548-4), whichever source reported it.
WITH diabetic AS (
    SELECT DISTINCT m.person_id
    FROM fact_mentions m
    WHERE m.kind = 'condition' AND m.person_id IS NOT NULL
      AND (list_contains(m.codes, 'http://snomed.info/sct|44054006')
           OR len(list_filter(m.codes, lambda c: c LIKE 'http://hl7.org/fhir/sid/icd-10-cm|E1_%'
                                                AND (c LIKE '%|E10%' OR c LIKE '%|E11%'))) > 0)
), a1c AS (
    SELECT person_id, effective_date, value_num, value_unit, n_sources,
           row_number() OVER (PARTITION BY person_id ORDER BY effective_date DESC, fact_id) AS rn
    FROM facts_results
    WHERE code_system = 'http://loinc.org' AND code = '4548-4'
)
SELECT d.person_id, a.effective_date AS last_a1c_date, a.value_num AS last_a1c,
       a.value_unit, a.n_sources
FROM diabetic d LEFT JOIN a1c a ON a.person_id = d.person_id AND a.rn = 1
ORDER BY last_a1c DESC NULLS LAST, d.person_id;

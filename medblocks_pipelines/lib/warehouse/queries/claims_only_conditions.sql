-- Diagnoses known only from claims: billed for the person but on no clinical problem list or
-- encounter we hold (a care gap or a missing clinical source).
SELECT f.person_id, f.code_system, f.code, f.display, f.effective_date, f.sources
FROM facts_conditions f
WHERE f.from_claims AND NOT f.from_clinical
ORDER BY f.person_id, f.effective_date;

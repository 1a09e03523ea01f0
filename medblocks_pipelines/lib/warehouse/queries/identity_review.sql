-- Identity decisions to review: links made by the probabilistic model with their score and the
-- comparison levels that made them, least certain first, and persons holding a vetoed pair.
SELECT 'link' AS item, l.person_id, l.patient_key, l.linked_to, l.rule, l.score, l.evidence,
       NULL::BIGINT AS conflicts
FROM patient_links l
WHERE l.rule = 'probabilistic'
UNION ALL
SELECT 'conflicted person', p.person_id, NULL, NULL, NULL, NULL, NULL, p.conflicts
FROM persons p
WHERE p.conflicts > 0
ORDER BY item DESC, score NULLS FIRST, person_id
LIMIT 200;

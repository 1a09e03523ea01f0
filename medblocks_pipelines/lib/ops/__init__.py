"""Operations: webhooks from the outbox, exports to files, object storage and FHIR servers."""

"""Drop-in facades: other APIs' shapes (OpenAI's first) over ordinary Atelier jobs.

A facade only translates: every request becomes a ``JobRequest`` submitted through the same
validation and ``Jobs.create`` as ``POST /v1/jobs`` (same store, tenancy, idempotency, storage,
webhooks and events), and every answer is rendered from the job record.
"""

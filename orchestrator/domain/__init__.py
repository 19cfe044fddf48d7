"""The pure domain: the job record, its state machine, deadlines and poll schedule, webhook records.
No I/O here; it knows the wire schemas and the provider contract only."""

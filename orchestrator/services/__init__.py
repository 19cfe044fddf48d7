"""The services the API and the workers share (jobs, batches, views, slots) and the composition root
(``runtime``)."""

"""`veritune serve`: the OpenAI-compatible HTTP API (schema, keys and limits, metrics, request
guard, streaming, agent mode), its engines (CPU micro-batches, GPU continuous batching, an
upstream server) and the load test (`stress` stage)."""

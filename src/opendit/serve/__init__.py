"""`opendit serve`: one long-lived `opendit.Engine` (its worker processes stay loaded) behind an HTTP API.

jobs.py     the bounded queue: jobs, their events, batching of compatible requests, fairness
runner.py   the engine thread: runs batches, splits results, restarts dead workers, drains on shutdown
metrics.py  Prometheus metrics (/metrics)
app.py      the FastAPI app: /v1/jobs, /v1/generate, /v1/images/generations (OpenAI), /healthz, /metrics, /
page.html   the web page at /
"""

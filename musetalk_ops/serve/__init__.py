"""Warm render workers (``musetalk serve``): one long-lived process per GPU that keeps the models, the
warmed batch buckets and the hot template caches resident, and renders whole replies over HTTP.

* ``worker``: the render queue, template residency, claims and records (no web framework);
* ``api``: the HTTP API (FastAPI) over a worker, with authentication, limits and error mapping;
* ``metrics``: the Prometheus metrics;
* ``server``: uvicorn with a draining shutdown (SIGTERM finishes in-flight renders, refuses new ones).

Nothing here imports Dagster: the store is the record of every render (``render_records``), and the
Dagster code location's direct-render sensor turns those records into materializations.
"""

"""Warm render workers: the HTTP API, the worker process, its faults, and how Dagster records them."""

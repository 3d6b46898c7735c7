"""Failure, restart, hostile-input and load tests of the pipeline with real servers and processes."""

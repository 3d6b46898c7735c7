"""Tests of the Dagster code location (pipelines): definitions, render job, sensors, submit, dev."""

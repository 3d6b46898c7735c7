"""Fixtures of the reliability suite: the deployment environment on a local store."""

from pathlib import Path

import pytest
from helpers import deployment_env


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch, demo_models) -> Path:
    """What a deployment sets: demo weights, a private engine cache, the local store (returned)."""
    return deployment_env(monkeypatch, tmp_path, demo_models)

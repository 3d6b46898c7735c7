"""Fixtures of the Kubernetes tests: a kubeconfig for dagster-k8s that points nowhere."""

from pathlib import Path

import pytest
import yaml


@pytest.fixture
def kubeconfig(tmp_path) -> Path:
    """A kubeconfig that parses but points nowhere: the code under test never reaches a cluster."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path

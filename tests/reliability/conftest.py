"""Fixtures of the reliability suite: the deployment environment on a local store, a persistent
instance, short speech, and a moto server of its own."""

import os
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import deployment_env, free_port, start_group, stop_group, wait_for


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch, demo_models) -> Path:
    """What a deployment sets: demo weights, a private engine cache, the local store (returned)."""
    return deployment_env(monkeypatch, tmp_path, demo_models)


@pytest.fixture
def moto_server(tmp_path):
    """A moto S3 server owned by this test (so that it can be paused), yielding (process, url)."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = start_group(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env, tmp_path / "moto.log"
    )
    url = f"http://127.0.0.1:{port}"
    wait_for("moto", lambda: urllib.request.urlopen(f"{url}/moto-api/", timeout=1), 30, tmp_path / "moto.log")
    yield proc, url
    os.killpg(proc.pid, signal.SIGCONT)
    stop_group(proc, signal.SIGTERM, 10)

"""Fixtures of the worker tests: a store holding the prepared astronaut, a warm worker on it, and its
API served by uvicorn on 127.0.0.1."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import publish_template, serving, worker_settings

from musetalk_ops.store import LocalStore


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, astronaut_cache) -> Path:
    root = tmp_path_factory.mktemp("worker-store")
    publish_template(LocalStore(root), astronaut_cache)
    return root


@pytest.fixture(scope="module")
def worker(store_root, demo_models):
    """A started (loaded and warmed) worker on the store; tests use ids of their own."""
    from musetalk_ops.serve.worker import Worker

    worker = Worker(LocalStore(store_root), worker_settings(demo_models), name="test-worker", queue_limit=2)
    worker.start(["astronaut"])
    yield worker
    worker.close()


@pytest.fixture
def api(worker) -> Iterator[str]:
    """The worker's API without a token (a fresh app: its metrics start at zero)."""
    from musetalk_ops.serve.api import create_app

    with serving(create_app(worker)) as url:
        yield url

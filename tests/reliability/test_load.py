"""The load test of bench/load_test.py at a CI-sized N (``MUSETALK_LOAD_N`` per path, default 1):
sensor and API requests under ``dagster dev`` all complete, decode with the right duration, stay within
the run queue's concurrency and are counted by ``musetalk stats``. The full run is the script itself."""

import importlib.util
import os

import pytest
from helpers import ROOT


def load_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_concurrent_sensor_and_api_requests_all_complete(tmp_path, demo_models):
    load_test = load_module()
    n = int(os.environ.get("MUSETALK_LOAD_N", "1"))
    report = load_test.run_load(n, n, concurrency=2, workdir=tmp_path, models=demo_models, timeout=900)
    assert report["problems"] == [] and report["requests"] == 2 * n
    assert report["stats"]["totalRequests"] == report["stats"]["completedRequests"] == 2 * n
    assert 1 <= report["max_concurrent_runs"] <= 2
    assert all(p["n"] == n and 0 < p["p50"] <= p["p95"] for p in report["latency"].values())
    assert "musetalk stats" in load_test.format_report(report)

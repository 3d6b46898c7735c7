"""``musetalk serve`` as a process: readiness, a draining SIGTERM, a worker killed mid-render, and what
the store and ``musetalk stats`` keep of each."""

import os
import signal
import threading
import urllib.request

import pytest
import requests
from helpers import BIN, free_port, post_reply, start_group, stop_group, wait_for

from musetalk_ops import keys
from musetalk_ops.serve.worker import INTERRUPTED
from musetalk_ops.store import LocalStore

pytestmark = pytest.mark.slow


def start_worker(tmp_path, store_root, models, name: str):
    """``musetalk serve`` on a free port, as a user starts it, once ready; returns (process, url, log)."""
    port = free_port()
    env = {
        **os.environ,
        "MUSETALK_STORE": str(store_root),
        "MUSETALK_MODELS": str(models),
        "MUSETALK_CACHE": str(tmp_path / "cache"),
    }
    argv = [str(BIN / "musetalk"), "serve", "--port", str(port), "--device", "cpu", "--batch-size", "8"]
    log = tmp_path / f"{name}.log"
    proc = start_group([*argv, "--name", name, "--preload-templates", "astronaut"], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "the worker's /healthz", lambda: urllib.request.urlopen(f"{url}/healthz", timeout=1), 60, log
        )
        wait_for("readiness", lambda: ready(url), 120, log)
    except BaseException:
        stop_group(proc)
        raise
    return proc, url, log


def ready(url: str) -> bool:
    return requests.get(f"{url}/readyz", timeout=2).status_code == 200


def post_in_thread(url: str, rid: str, audio, store, log) -> tuple[threading.Thread, dict]:
    """POST a reply from a thread and wait until the worker has claimed its id (it is rendering)."""
    answer: dict = {}

    def post() -> None:
        try:
            answer["response"] = post_reply(url, rid, audio)
        except requests.ConnectionError as e:
            answer["error"] = e

    thread = threading.Thread(target=post)
    thread.start()
    wait_for("the render to claim its id", lambda: store.exists(keys.claim(rid)), 60, log, every=0.05)
    return thread, answer


def test_sigterm_finishes_the_render_in_flight_refuses_new_ones_and_exits(
    tmp_path, store_root, demo_models, speech_wav
):
    proc, url, log = start_worker(tmp_path, store_root, demo_models, "drained")
    store = LocalStore(store_root)
    try:
        thread, answer = post_in_thread(url, "in-flight", speech_wav, store, log)
        os.killpg(proc.pid, signal.SIGTERM)
        wait_for(
            "draining", lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 503, 10, log, 0.05
        )
        late = post_reply(url, None, speech_wav)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        thread.join(120)
        assert answer["response"].status_code == 200, answer
        assert proc.wait(timeout=60) == 0
    finally:
        stop_group(proc)
    assert store.exists("renders/in-flight.mp4") and store.exists("renders/in-flight.json")
    assert "draining: 1 render(s) in flight" in log.read_text()


def test_a_worker_killed_mid_render_leaves_no_video_and_its_restart_records_the_failure(
    tmp_path, store_root, demo_models, speech_wav
):
    store = LocalStore(store_root)
    proc, url, log = start_worker(tmp_path, store_root, demo_models, "killed")
    try:
        thread, answer = post_in_thread(url, "cut-short", speech_wav, store, log)
        os.killpg(proc.pid, signal.SIGKILL)
        thread.join(60)
    finally:
        stop_group(proc)
    assert "error" in answer or answer["response"].status_code >= 500  # a dropped connection
    assert not store.exists("renders/cut-short.mp4") and not store.exists("renders/cut-short.json")
    assert [i.key for i in store.list("renders/") if "cut-short" in i.key] == []

    proc, url, log = start_worker(tmp_path, store_root, demo_models, "killed")
    try:
        status = requests.get(f"{url}/v1/renders/cut-short", timeout=5).json()
        assert status == {"id": "cut-short", "status": "failed", "error": INTERRUPTED}
        again = post_reply(url, "cut-short", speech_wav)
        assert again.status_code == 409  # the id stays used: its failure is on record
    finally:
        stop_group(proc, signal.SIGTERM)
    assert "1 interrupted render(s) recorded" in log.read_text()

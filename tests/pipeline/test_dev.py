"""The product as users run it: ``dagster dev`` (webserver + daemon + code server) from workspace.yaml,
templates prepared by template_sensor, a render through GraphQL with ``musetalk submit --wait``, a bad
request refused by render_request_sensor, a direct render on ``musetalk serve`` recorded by the daemon's
direct_render_sensor, and ``musetalk stats``."""

import json
import os
import signal
import subprocess
import sys

import pytest
import requests
import soundfile as sf
from helpers import (
    BIN,
    dagster_dev_server,
    free_port,
    post_reply,
    start_group,
    stop_group,
    wait_for,
    wait_for_template,
)

from musetalk_ops.local_env import write_env_file
from musetalk_ops.store import LocalStore
from musetalk_ops.video import probe
from pipelines.demo import instance_yaml
from pipelines.graphql import GraphQLClient

FAILED_RUNS = "{ runsOrError(filter: {statuses: [FAILURE]}) { ... on Runs { results { runId jobName } } } }"
DIRECT_RENDER = """{ assetOrError(assetKey: {path: ["rendered_video"]}) { ... on Asset {
  assetMaterializations(partitions: ["direct-e2e"], limit: 1) { partition runId } } } }"""


@pytest.fixture
def dagster_dev(tmp_path, demo_models):
    """``dagster dev`` as a newcomer starts it after ``make demo``: the instance (the config ``make demo``
    writes) and the weights are named only in the ``.env`` of the working directory, as ``make demo``
    records them. In its own process group on a free port; yields (env, store, log, working directory)."""
    port = free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(gpus=1))
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    write_env_file({"DAGSTER_HOME": str(home), "MUSETALK_MODELS": str(demo_models)}, checkout / ".env")
    env = {
        **os.environ,
        "MUSETALK_STORE": str(tmp_path / "store"),
        "MUSETALK_CACHE": str(tmp_path / "cache"),
        "MUSETALK_DAGSTER_URL": f"http://127.0.0.1:{port}",
        "MUSETALK_GPUS": "1",
    }
    for name in ("DAGSTER_HOME", "MUSETALK_MODELS", "MUSETALK_S3_BUCKET", "MUSETALK_EXECUTOR"):
        env.pop(name, None)
    log = tmp_path / "dagster-dev.log"
    with dagster_dev_server(env, port, log, cwd=checkout):
        yield env, LocalStore(tmp_path / "store"), log, checkout


def musetalk(env: dict, cwd, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def render_on_a_worker(env: dict, checkout, tmp_path, audio) -> dict:
    """``musetalk serve`` as the README starts it beside ``dagster dev`` (weights from .env), one reply."""
    port = free_port()
    argv = [str(BIN / "musetalk"), "serve", "--port", str(port), "--batch-size", "8"]
    log = tmp_path / "serve.log"
    proc = start_group(argv, env, log, cwd=checkout)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the worker", lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 120, log)
        answer = post_reply(url, "direct-e2e", audio, template="astro")
        assert answer.status_code == 200, answer.text
        return answer.json()
    finally:
        stop_group(proc, signal.SIGTERM)


@pytest.mark.slow
def test_render_through_graphql_under_dagster_dev(dagster_dev, astronaut_png, speech_wav, tmp_path):
    env, store, log, checkout = dagster_dev
    store.put_file("templates/astro/source.png", astronaut_png)
    store.put_bytes("templates/astro/settings.yaml", b"face_box: [177, 66, 272, 175]\n")
    client = GraphQLClient(env["MUSETALK_DAGSTER_URL"])
    wait_for_template(client, "astro", log)

    done = musetalk(
        env,
        checkout,
        "submit",
        "--template",
        "astro",
        "--audio",
        str(speech_wav),
        "--id",
        "e2e",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
    result = json.loads(done.stdout)
    frames = sf.info(speech_wav).frames * 25 // 16000
    assert result["status"] == "SUCCESS" and result["video"].endswith("/renders/e2e.mp4")
    assert result["timings"]["frames"] == frames and result["timings"]["weights"] == "demo"
    latency = result["latency"]
    assert set(latency) == {"submit", "queue", "launch", "model_load", "render", "merge", "total", "overhead"}
    assert 0 < latency["render"] < latency["total"]
    store.get_file("renders/e2e.mp4", tmp_path / "e2e.mp4")
    info = probe(tmp_path / "e2e.mp4")
    assert info.frames == frames and info.audio_codec == "aac"

    again = musetalk(
        env, checkout, "submit", "--template", "astro", "--audio", str(speech_wav), "--id", "e2e"
    )
    assert again.returncode == 2 and "already exists" in again.stderr

    store.put_bytes(
        "requests/stray.json", json.dumps({"template": "nobody", "audio": "audio/x.wav"}).encode()
    )
    reason = wait_for(
        "render_request_sensor to refuse a request",
        lambda: (
            store.exists("requests/rejected/stray.reason.txt")
            and store.get_bytes("requests/rejected/stray.reason.txt").decode()
        ),
        60,
        log,
    )
    assert "unknown template 'nobody'" in reason

    direct = render_on_a_worker(env, checkout, tmp_path, speech_wav)
    assert direct["timings"]["source"] == "worker" and direct["timings"]["frames"] == frames
    recorded = wait_for(
        "direct_render_sensor to record the direct render",
        lambda: client.query(DIRECT_RENDER)["assetOrError"]["assetMaterializations"],
        90,
        log,
    )
    assert recorded[0]["partition"] == "direct-e2e"

    stats = musetalk(env, checkout, "stats", "--json", timeout=120)
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert (report["totalRequests"], report["completedRequests"], report["rejectedRequests"]) == (2, 2, 1)
    assert report["paths"]["worker"]["completed"] == 1 and report["paths"]["run"]["completed"] == 1
    assert report["templateUsage"] == {"astro": 2} and report["status"]["codeLocation"] == "loaded"
    assert client.query(FAILED_RUNS)["runsOrError"]["results"] == []  # nothing red in the UI

"""The Dagster daemon killed and restarted while render runs are queued: no request is lost and none
is rendered twice. Production topology in miniature: a code server (``dagster api grpc``) that owns
the run workers, and a ``dagster-daemon`` in its own process group that is SIGKILLed mid-queue."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from helpers import ROOT, free_port, start_group, stop_group, wait_for
from pipeline.test_render import materialize, push_template, submit_request

from musetalk_ops.store import open_store
from musetalk_ops.video import probe
from pipelines.demo import instance_yaml

BIN = Path(sys.executable).parent


def _all_runs(instance) -> list[dg.DagsterRun]:
    return [r for rs in runs_by_request(instance).values() for r in rs]


def _queued_and_started(instance, rids: list[str]) -> bool:
    statuses = {r.status for r in _all_runs(instance)}
    return set(rids) <= set(runs_by_request(instance)) and dg.DagsterRunStatus.STARTED in statuses


def runs_by_request(instance) -> dict[str, list[dg.DagsterRun]]:
    found: dict[str, list[dg.DagsterRun]] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(job_name="render_video")):
        found.setdefault(run.tags["dagster/partition"], []).append(run)
    return found


@pytest.mark.slow
def test_daemon_restart_loses_no_request_and_renders_none_twice(
    pipeline_env, tmp_path, monkeypatch, astronaut_png, short_speech
):
    home = tmp_path / "home"
    home.mkdir()
    # the local instance config (run monitoring and retries included), one run at a time
    (home / "dagster.yaml").write_text(instance_yaml(gpus=1, max_concurrent_runs=1))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MUSETALK_GPUS", "1")
    port = free_port()
    workspace = tmp_path / "workspace.yaml"
    server = f"host: 127.0.0.1\n      port: {port}\n      location_name: musetalk\n"
    workspace.write_text(f"load_from:\n  - grpc_server:\n      {server}")
    env = dict(os.environ)
    log = tmp_path / "servers.log"
    code = start_group(
        [
            str(BIN / "dagster"),
            "api",
            "grpc",
            "-m",
            "pipelines.definitions",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env,
        log,
    )
    daemon = None
    try:
        health = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)]
        wait_for("the code server", lambda: _ok(health, env), 180, log, every=2)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            push_template(astronaut_png)
            assert materialize(instance).success
            daemon_argv = [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)]
            daemon = start_group(daemon_argv, env, log, cwd=tmp_path)
            first = [f"q{i}" for i in range(3)]
            for rid in first:
                submit_request(rid, short_speech)
            wait_for(
                "every request queued, one run started",
                lambda: _queued_and_started(instance, first),
                240,
                log,
            )
            queued = [r for r in _all_runs(instance) if r.status == dg.DagsterRunStatus.QUEUED]
            assert queued, "runs were waiting in the queue when the daemon died"
            stop_group(daemon, signal.SIGKILL)  # a crash, not a shutdown
            submit_request("q-while-down", short_speech)
            time.sleep(3)
            daemon = start_group(daemon_argv, env, log, cwd=tmp_path)
            everyone = [*first, "q-while-down"]
            wait_for(
                "every request to finish",
                lambda: all(
                    rid in runs_by_request(instance) and runs_by_request(instance)[rid][0].is_finished
                    for rid in everyone
                ),
                600,
                log,
                every=2,
            )
            runs = runs_by_request(instance)
        assert {rid: len(rs) for rid, rs in runs.items()} == dict.fromkeys(everyone, 1)
        assert all(rs[0].status == dg.DagsterRunStatus.SUCCESS for rs in runs.values())
        store = open_store()
        assert sorted(i.key for i in store.list("renders/")) == sorted(
            f"renders/{rid}.{ext}" for rid in everyone for ext in ("json", "mp4")
        )
        assert store.list("work/") == [] and store.list("requests/rejected/") == []
        out = tmp_path / "q0.mp4"
        store.get_file("renders/q0.mp4", out)
        assert probe(out).frames == json.loads(store.get_bytes("renders/q0.json"))["frames"]
    finally:
        if daemon is not None:
            stop_group(daemon)
        stop_group(code)


def _ok(argv: list[str], env: dict) -> bool:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=30).returncode == 0

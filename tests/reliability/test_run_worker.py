"""The run worker of a render run SIGKILLed mid-chunk under ``dagster dev`` (webserver + daemon + code
server, SQLite instance, DefaultRunLauncher, QueuedRunCoordinator), with the instance config that
``make demo`` writes (pipelines/demo.py).

What recovers it, all Dagster configuration: the code server that spawned the worker notices the exit
and marks the run failed (the DefaultRunLauncher has no health check); run monitoring gives back the
``gpu`` pool slot the dead run still holds; run retries re-execute the run from failure, so the chunk
that was finished is reused and only the interrupted one and the merge run again.
"""

import os
import re
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from helpers import dagster_dev_server, decoded_frames, free_port, wait_for, wait_for_template
from pipeline.test_render import CHUNK_CONFIG, expected_frames, push_template, run_render

from musetalk_ops import keys
from musetalk_ops.store import Store, open_store
from pipelines.demo import instance_yaml
from pipelines.graphql import GraphQLClient
from pipelines.stats import collect_stats
from pipelines.submit import submit, wait

from .test_faults import TAGS, fetch, put_request

RUN_WORKER = re.compile(r"Started process for run \(pid: (\d+)\)")


def _events(instance: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    return [r.dagster_event for r in instance.all_logs(run_id) if r.dagster_event]


def _step_starts(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    """``{step key: pid}`` of every step that started in the run."""
    return {e.step_key: e.pid for e in _events(instance, run_id) if e.event_type_value == "STEP_START"}


def _succeeded(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return sorted(e.step_key for e in _events(instance, run_id) if e.event_type_value == "STEP_SUCCESS")


def _watch(store: Store, prefix: str, stop: threading.Event) -> dict[str, set[int]]:
    """Start listing ``prefix`` every 50 ms until ``stop``; returns ``{key: sizes seen}``, filled in
    as it goes: an object that ever showed up incomplete has more than one size."""
    seen: dict[str, set[int]] = {}

    def poll() -> None:
        while not stop.wait(0.05):
            for info in store.list(prefix):
                seen.setdefault(info.key, set()).add(info.size)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def _kill_while_rendering(pid: int, scratch: Path, store: Store, segment: str, log: Path) -> None:
    """SIGKILL ``pid`` while it renders the chunk uploaded as ``segment``. Each check is made with the
    process stopped (SIGSTOP), so it dies in the state checked: the chunk's inputs are in its scratch
    directory (features fetched, the engine running) and its segment is not uploaded. Call it once
    the chunk's step has started: the scratch directories of earlier chunks are gone by then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        if any(scratch.glob("musetalk-chunk-*/features.safetensors")):
            assert not store.exists(segment), f"{segment} was uploaded before the kill: too late"
            os.kill(pid, signal.SIGKILL)
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)
    pytest.fail(f"pid {pid} never fetched the chunk's inputs\n{log.read_text(errors='replace')[-3000:]}")


def _files_under(root: Path) -> list[str]:
    """Every file on disk under ``root`` (temporary and hidden ones included), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_instance_config_recovers_dead_run_workers(tmp_path):
    """The instance config of `make demo` / `dagster dev` loads on the DefaultRunLauncher (which cannot
    resume a run: max_resume_run_attempts must stay 0) and starts the daemons the recovery needs."""
    (tmp_path / "dagster.yaml").write_text(instance_yaml(gpus=2))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert not instance.run_launcher.supports_resume_run
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0
        assert 0 < instance.run_monitoring_settings["free_slots_after_run_end_seconds"] <= 10
        assert instance.run_monitoring_poll_interval_seconds <= 10
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure
        daemons = set(instance.get_required_daemon_types())
        assert {"MONITORING", "EVENT_LOG_CONSUMER", "QUEUED_RUN_COORDINATOR"} <= daemons
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 2


@pytest.mark.slow
def test_run_worker_killed_mid_chunk_is_retried_from_failure(
    pipeline_env, tmp_path, monkeypatch, astronaut_png, short_speech
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    # One `gpu` pool slot for two chunks: the retry needs the very slot the dead run held.
    (home / "dagster.yaml").write_text(instance_yaml(gpus=1))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    port = free_port()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MUSETALK_DAGSTER_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TMPDIR", str(scratch))  # the run worker's chunk scratch: shows a chunk's progress
    log = tmp_path / "dagster-dev.log"
    store = open_store()
    push_template(astronaut_png)
    options = {"batch_size": 2}  # small batches: a chunk lasts long enough to be caught mid-way

    with (
        dagster_dev_server(dict(os.environ), port, log, cwd=tmp_path, timeout=180) as url,
        dg.DagsterInstance.from_config(str(home)) as instance,
    ):
        client = GraphQLClient(url)
        wait_for_template(client, "astro", log)
        submission = submit(
            store,
            "astro",
            short_speech,
            request_id="killed",
            options=options,
            client=client,
            run_config=CHUNK_CONFIG,
        )
        first = submission.run_id
        stop = threading.Event()
        renders = _watch(store, "renders/", stop)

        pid = wait_for(
            "render_chunk[c0001] to start",
            lambda: _step_starts(instance, first).get("render_chunk[c0001]"),
            240,
            log,
            every=0.05,
        )
        worker = [int(m[1]) for e in _events(instance, first) if (m := RUN_WORKER.search(e.message or ""))]
        assert worker == [pid], "the in-process executor renders in the run worker: that is what dies"
        _kill_while_rendering(pid, scratch, store, keys.work_chunk("killed", 1), log)
        killed_at = time.time()

        done = wait(submission, store, client, timeout=240)  # what `musetalk submit --wait` does
        stop.set()
        assert done.status == "SUCCESS", (done.result, log.read_text()[-3000:])
        retry = instance.get_run_by_id(done.run_id)
        retry_end = instance.get_run_record_by_id(retry.run_id).end_time
        dead = instance.get_run_by_id(first)
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "killed"}))
        report = collect_stats(instance, store, client=client)
        print(f"\nkill → retry run SUCCESS: {retry_end - killed_at:.1f} s")

        # the dead run: detected, failed, handed to the retry daemon
        assert dead.status == dg.DagsterRunStatus.FAILURE
        assert dead.tags["dagster/will_retry"] == "true"
        assert dead.tags["dagster/auto_retry_run_id"] == retry.run_id
        messages = [e.message or "" for e in _events(instance, first)]
        assert any(
            f"Run execution process for {first} was terminated by signal 9 (SIGKILL)" in m for m in messages
        )
        assert done.result["failed_runs"] == [first] and done.url.endswith(retry.run_id)

        # the retry: from failure, the finished chunk reused, only the interrupted chunk and the merge
        assert sorted(r.run_id for r in runs) == sorted([first, retry.run_id])
        assert retry.parent_run_id == first and retry.root_run_id == first
        assert retry.tags["dagster/retry_number"] == "1" and retry.tags["musetalk/template"] == "astro"
        assert set(retry.step_keys_to_execute) == {"render_chunk[c0001]", "merge_video"}
        assert _succeeded(instance, first) == [
            "audio_features",
            "load_request",
            "plan_chunks",
            "render_chunk[c0000]",
        ]
        assert _succeeded(instance, retry.run_id) == ["merge_video", "render_chunk[c0001]"]

        # what the user sees: one completed request, one video
        assert (report["totalRequests"], report["completedRequests"], report["failedRequests"]) == (1, 1, 0)
        assert report["inProgressRequests"] == 0 and report["templateUsage"] == {"astro": 1}
        assert report["renders"] == 1

    # what is left in storage: the video and its timings, nothing partial (ever), no intermediates
    assert _files_under(Path(store.root) / "renders") == ["killed.json", "killed.mp4"]
    assert renders == {i.key: {i.size} for i in store.list("renders/")}
    assert store.list("work/") == []
    assert not [f for f in _files_under(Path(store.root)) if "~tmp" in f]
    # ... what SIGKILL does leave: the dead worker's local scratch (its TemporaryDirectory) on its host
    assert len(list(scratch.glob("musetalk-chunk-*"))) == 1
    killed = decoded_frames(fetch("renders/killed.mp4", tmp_path))
    assert killed.shape[0] == expected_frames(short_speech) == done.result["timings"]["frames"]

    # the same request, never disturbed (in-process, same chunks and options): the same frames (CPU)
    put_request("calm", short_speech, options)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert run_render(instance, "calm", tags=TAGS).success
    assert (decoded_frames(fetch("renders/calm.mp4", tmp_path)) == killed).all()

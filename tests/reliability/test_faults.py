"""Injected faults: each test asserts what happens, what the user sees and what is left in storage.

Runs use the real code location (build_defs), the demo weights, and a local store or a moto S3
server of the test's own (paused with SIGSTOP, or cut by a loopback TCP proxy).
"""

import json
import os
import signal
import threading
import time
import uuid
import weakref
from pathlib import Path

import boto3
import dagster as dg
import pytest
import torch
from dagster._core.definitions.reconstruct import ReconstructableJob
from helpers import TcpProxy, decoded_frames, impatient_s3, limit_gpu_batch, wait_for
from pipeline.test_render import (
    CHUNK_CONFIG,
    expected_frames,
    materialize,
    push_template,
    render_job,
    run_render,
    submit_request,
)

from musetalk_ops.errors import GpuMemoryError, StoreError
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.s3_store import S3Store
from musetalk_ops.store import open_store
from musetalk_ops.video import probe

TAGS = {"musetalk/template": "astro"}


def step_failures(events) -> dict[str, str]:
    """``{step key: the one-line message it failed with}`` (user failures only)."""
    found = {}
    for event in events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            assert data.user_failure_data is not None, data.error
            found[event.step_key] = data.user_failure_data.description
    return found


def retries(events) -> list[str]:
    return [e.step_key for e in events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def execute(instance, rid: str, **kwargs) -> dg.DagsterRun:
    """``render_video`` through ``execute_job`` (what re-execution needs), with the test config."""
    if not instance.has_dynamic_partition("render_requests", rid):
        instance.add_dynamic_partitions("render_requests", [rid])
    tags = {"dagster/partition": rid, **TAGS}
    # ReconstructableJob memoises the last definition per process (lru_cache): without this, a run
    # would reuse the resources and executor built from an earlier test's environment.
    ReconstructableJob.get_definition.cache_clear()
    ReconstructableJob.get_repository_definition.cache_clear()
    job = dg.reconstructable(render_job)
    with dg.execute_job(job, instance, CHUNK_CONFIG, tags, raise_on_error=False, **kwargs) as result:
        return result.dagster_run


def events_of(instance, run: dg.DagsterRun) -> list[dg.DagsterEvent]:
    return [r.dagster_event for r in instance.all_logs(run.run_id) if r.dagster_event]


def put_request(rid: str, audio: Path, options: dict) -> None:
    store = open_store()
    store.put_file(f"audio/{rid}.wav", audio)
    body = {"template": "astro", "audio": f"audio/{rid}.wav", "options": options}
    store.put_bytes(f"requests/{rid}.json", json.dumps(body).encode())


def fetch(key: str, tmp: Path) -> Path:
    out = tmp / key.replace("/", "_")
    open_store().get_file(key, out)
    return out


# --- a template cache damaged in the store -------------------------------------------------------


def _truncate(store, key: str) -> None:
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])


DAMAGE = {
    "latents-truncated": lambda store, prefix: _truncate(store, prefix + "latents.safetensors"),
    "masks-deleted": lambda store, prefix: store.delete(prefix + "masks.npz"),
    "manifest-truncated": lambda store, prefix: _truncate(store, prefix + "manifest.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_is_refused_then_repaired(pipeline_env, instance, astronaut_png, short_speech, damage):
    push_template(astronaut_png)
    first = materialize(instance).get_asset_materialization_events()
    fingerprint = first[0].materialization.metadata["fingerprint"].value
    store = open_store()
    prefix = f"cache/templates/astro/{fingerprint}/"
    intact = {i.key: store.get_bytes(i.key) for i in store.list(prefix)}
    DAMAGE[damage](store, prefix)

    submit_request("before", short_speech)
    failed = run_render(instance, "before", raise_on_error=False, tags=TAGS)
    assert not failed.success
    (message,) = set(step_failures(failed.all_events).values())  # every chunk: the same line
    assert f"template cache {store.uri(prefix)}" in message and "\n" not in message
    assert "re-materialize template_cache partition" in message
    assert retries(failed.all_events) == []  # a damaged cache fails the same way twice: no retry
    assert store.list("renders/") == []
    local = Path(os.environ["MUSETALK_CACHE"]) / "templates" / "astro" / fingerprint
    assert not local.exists()  # the damaged copy was not kept for later renders

    repaired = materialize(instance)  # no force: the skip logic loads the cache and notices
    assert len(repaired.get_asset_materialization_events()) == 1
    checks = {c.check_name: c.passed for c in repaired.get_asset_check_evaluations()}
    assert checks == {"faces_present": True, "cache_loadable": True}
    logs = [r.user_message for r in instance.all_logs(repaired.run_id)]
    assert any(f"cache {store.uri(prefix)} is damaged" in m for m in logs)
    assert {i.key: store.get_bytes(i.key) for i in store.list(prefix)} == intact  # bit-identical repair

    assert len(materialize(instance).get_asset_materialization_events()) == 0  # intact again: no work
    submit_request("after", short_speech)
    assert run_render(instance, "after", tags=TAGS).success
    assert store.exists("renders/after.mp4")


# --- CUDA out of memory --------------------------------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_halves_the_batch_until_it_fits(monkeypatch):
    from musetalk_ops.render import chunks

    tried: list[int] = []

    def once(*args):
        tried.append(args[6].batch_size)
        if args[6].batch_size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return args[6].batch_size

    def render(batch_size: int) -> int:
        return chunks.render_chunk(
            *"mtfab", "out.mp4", RenderSettings(batch_size=batch_size), on_retry=told.append
        )

    monkeypatch.setattr(chunks, "_render_once", once)
    told: list[str] = []
    limit = 3
    assert render(20) == 2
    assert tried == [20, 10, 5, 2]
    assert told[0] == "CUDA out of memory at batch size 20: retrying with 10" and len(told) == 3

    tried.clear()
    limit = 0
    with pytest.raises(GpuMemoryError) as failed:
        render(4)
    assert str(failed.value) == (  # one line: the first of torch's message
        "CUDA out of memory even at batch size 1: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert tried == [4, 2, 1]

    tried.clear()
    limit = 100
    limit_gpu_batch(monkeypatch, 6)  # refuses before the stand-in runs
    assert render(32) == 4
    assert tried == [4]


def test_a_failed_attempt_holds_nothing_when_gpu_memory_is_released(monkeypatch):
    """The retry returns GPU memory only after the error's traceback is gone: while it lives, it keeps
    the failed attempt's frames, and so their tensors and generator, and a smaller batch would not fit
    where it could."""
    from musetalk_ops.render import chunks

    class Held:  # stands for the failed attempt's tensors and generator
        pass

    attempts: list[weakref.ref] = []
    alive_at_release: list[list[bool]] = []

    def once(*args):
        held = Held()
        attempts.append(weakref.ref(held))
        if len(attempts) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "rendered"

    monkeypatch.setattr(chunks, "_render_once", once)
    monkeypatch.setattr(
        chunks, "release_gpu_memory", lambda: alive_at_release.append([a() is not None for a in attempts])
    )
    assert chunks.render_chunk(*"mtfab", "out.mp4", RenderSettings(batch_size=4)) == "rendered"
    assert alive_at_release == [[False]]


@pytest.mark.slow
def test_chunk_out_of_memory_retries_smaller_and_matches_a_small_batch_render(
    pipeline_env, instance, astronaut_png, short_speech, monkeypatch, tmp_path
):
    push_template(astronaut_png)
    materialize(instance)
    put_request("calm", short_speech, {"batch_size": 4})
    assert run_render(instance, "calm", tags=TAGS).success

    limit_gpu_batch(monkeypatch, 4)
    put_request("squeezed", short_speech, {"batch_size": 16})
    result = run_render(instance, "squeezed", tags=TAGS)
    assert result.success and retries(result.all_events) == []  # handled inside the step
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert sum("CUDA out of memory at batch size 16: retrying with 8" in m for m in logs) == 2  # 2 chunks
    assert sum("CUDA out of memory at batch size 8: retrying with 4" in m for m in logs) == 2
    timings = json.loads(open_store().get_bytes("renders/squeezed.json"))
    assert timings["batch_size"] == 4 and timings["frames"] == expected_frames(short_speech)
    calm, squeezed = (decoded_frames(fetch(f"renders/{r}.mp4", tmp_path)) for r in ("calm", "squeezed"))
    assert calm.shape[0] == expected_frames(short_speech) and (calm == squeezed).all()


# --- the S3 endpoint unavailable -----------------------------------------------------------------


@pytest.fixture
def s3_via_proxy(moto_server, monkeypatch):
    """The store on moto behind a cuttable proxy; yields (proxy, a boto3 client that bypasses it)."""
    _proc, url = moto_server
    proxy = TcpProxy(int(url.rsplit(":", 1)[1]))
    bucket = f"rel-{uuid.uuid4().hex[:12]}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": proxy.url,
        "MUSETALK_S3_BUCKET": bucket,
        "MUSETALK_S3_PREFIX": "prod",
    }.items():
        monkeypatch.setenv(name, value)
    direct = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    direct.create_bucket(Bucket=bucket)
    yield (
        proxy,
        lambda prefix: {
            o["Key"].removeprefix("prod/"): o["Size"]
            for o in direct.list_objects_v2(Bucket=bucket, Prefix=f"prod/{prefix}").get("Contents", [])
        },
    )
    proxy.cut()  # stop listening and drop the connections


@pytest.mark.slow
def test_s3_cut_during_cache_upload_leaves_no_visible_cache(
    pipeline_env, s3_via_proxy, instance, astronaut_png, monkeypatch
):
    from musetalk_ops.s3_store import S3Store

    proxy, listing = s3_via_proxy
    push_template(astronaut_png)
    real_put = S3Store.put_file
    uploaded: list[str] = []

    def put_file(self, key, path):
        if key.startswith("cache/"):
            if len(uploaded) == 2:
                proxy.cut()
            uploaded.append(key)
        return real_put(self, key, path)

    monkeypatch.setattr(S3Store, "put_file", put_file)
    failed = materialize_quietly(instance)
    (message,) = step_failures(failed.all_events).values()
    assert message.startswith("object store unreachable at http://127.0.0.1:") and "\n" not in message
    stored = listing("cache/")
    assert len(stored) == 2 and not any(k.endswith("manifest.json") for k in stored)  # never visible
    assert all(size > 0 for size in stored.values())

    proxy.restore()
    monkeypatch.setattr(S3Store, "put_file", real_put)
    assert len(materialize(instance).get_asset_materialization_events()) == 1
    assert any(k.endswith("manifest.json") for k in listing("cache/"))


def materialize_quietly(instance) -> dg.ExecuteInProcessResult:
    from pipelines.assets import template_cache
    from pipelines.resources import default_resources

    instance.add_dynamic_partitions("templates", ["astro"])
    return dg.materialize(
        [template_cache],
        partition_key="astro",
        instance=instance,
        resources=default_resources(),
        raise_on_error=False,
    )


@pytest.mark.slow
def test_s3_cut_during_a_run_fails_clearly_and_reexecution_completes(
    pipeline_env, s3_via_proxy, instance, astronaut_png, short_speech, monkeypatch, tmp_path
):
    """Cut while the merge uploads the video: the step fails with one line, renders/ stays empty,
    the chunks stay for re-execution from failure, which completes. Cut during a chunk: the step
    retry (RetryPolicy, after 10 s) completes once the endpoint is back."""
    from musetalk_ops.render import chunks as chunk_api
    from musetalk_ops.video import mux as real_mux

    proxy, listing = s3_via_proxy
    push_template(astronaut_png)
    materialize(instance)
    submit_request("cut", short_speech)

    def mux_then_cut(*args, **kwargs):
        real_mux(*args, **kwargs)
        proxy.cut()

    monkeypatch.setattr("pipelines.jobs.mux", mux_then_cut)
    first = execute(instance, "cut")
    assert first.status == dg.DagsterRunStatus.FAILURE
    failures = step_failures(events_of(instance, first))
    assert list(failures) == ["merge_video"]
    assert failures["merge_video"].startswith("object store unreachable at http://127.0.0.1:")
    assert "\n" not in failures["merge_video"]
    assert listing("renders/") == {}
    assert sorted(listing("work/cut/chunks/")) == [
        f"work/cut/chunks/{n:04d}.{e}" for n in (0, 1) for e in ("json", "mp4")
    ]

    proxy.restore()
    monkeypatch.setattr("pipelines.jobs.mux", real_mux)
    again = execute(
        instance, "cut", reexecution_options=dg.ReexecutionOptions.from_failure(first.run_id, instance)
    )
    assert again.status == dg.DagsterRunStatus.SUCCESS
    assert sorted(listing("renders/")) == ["renders/cut.json", "renders/cut.mp4"] and listing("work/") == {}
    assert probe(fetch("renders/cut.mp4", tmp_path)).frames == expected_frames(short_speech)

    real_render = chunk_api.render_chunk
    cuts = []

    def render_then_cut(*args, **kwargs):
        result = real_render(*args, **kwargs)
        if not cuts:
            cuts.append(proxy.cut())
            threading.Timer(3, proxy.restore).start()
        return result

    monkeypatch.setattr(chunk_api, "render_chunk", render_then_cut)
    submit_request("blip", short_speech)
    run = execute(instance, "blip")
    assert run.status == dg.DagsterRunStatus.SUCCESS
    events = events_of(instance, run)
    # c0000 failed uploading; c0001 (next, in process) may fail too (reading its inputs through the
    # S3 IO manager) if the endpoint is still away
    assert "render_chunk[c0000]" in retries(events)
    assert set(retries(events)) <= {"render_chunk[c0000]", "render_chunk[c0001]"}
    first_retry = next(e for e in events if e.event_type_value == "STEP_UP_FOR_RETRY")
    assert "object store unreachable at http://127.0.0.1:" in str(first_retry.event_specific_data)
    assert probe(fetch("renders/blip.mp4", tmp_path)).frames == expected_frames(short_speech)


@pytest.mark.slow
def test_s3_paused_briefly_only_delays_the_run(
    pipeline_env, moto_server, s3_via_proxy, instance, astronaut_png, short_speech, monkeypatch
):
    """SIGSTOP the moto process for 3 s mid-chunk: requests wait (read timeout 60 s), nothing fails."""
    from musetalk_ops.render import chunks as chunk_api

    proc, _url = moto_server
    _proxy, listing = s3_via_proxy
    push_template(astronaut_png)
    materialize(instance)
    submit_request("pause", short_speech)
    real_render = chunk_api.render_chunk
    paused: list[float] = []

    def render_then_pause(*args, **kwargs):
        result = real_render(*args, **kwargs)
        if not paused:
            os.kill(proc.pid, signal.SIGSTOP)
            paused.append(time.monotonic())
            threading.Timer(3, os.kill, (proc.pid, signal.SIGCONT)).start()
        return result

    monkeypatch.setattr(chunk_api, "render_chunk", render_then_pause)
    run = execute(instance, "pause")
    assert run.status == dg.DagsterRunStatus.SUCCESS and retries(events_of(instance, run)) == []
    assert time.monotonic() - paused[0] >= 3
    assert sorted(listing("renders/")) == ["renders/pause.json", "renders/pause.mp4"]


def test_s3_hung_past_the_read_timeout_fails_with_one_line_then_recovers(moto_server, monkeypatch):
    """SIGSTOP moto for longer than ``$MUSETALK_S3_READ_TIMEOUT``: the read gives up after
    read timeout × attempts with a one-line StoreError (what a step shows); once the endpoint is
    back the same store works."""
    proc, url = moto_server
    impatient_s3(monkeypatch, attempts=2)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="hang")
    store = S3Store("hang", endpoint_url=url)
    store.put_bytes("requests/r1.json", b"{}")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(StoreError) as failed:
            store.get_bytes("requests/r1.json")
        waited = time.monotonic() - start
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert 2 <= waited < 10  # two attempts of 1 s plus backoff, not boto3's default 60 s each
    message = str(failed.value)
    assert message.startswith(f"object store unreachable at {url}: Read timeout") and "\n" not in message
    assert store.get_bytes("requests/r1.json") == b"{}"


# --- a render_chunk step process killed mid-chunk -----------------------------------------------


def _running_chunk_pids(instance, run_id: str) -> dict[str, int]:
    started, ended = {}, set()
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not (event.step_key or "").startswith("render_chunk"):
            continue
        if event.event_type_value == "STEP_START":
            started[event.step_key] = event.pid
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY"):
            ended.add(event.step_key)
    return {k: pid for k, pid in started.items() if k not in ended}


def _run_of(instance, rid: str) -> str | None:
    return next((r.run_id for r in instance.get_runs() if r.tags.get("dagster/partition") == rid), None)


def _writing_segment(pid: int, scratch: Path) -> bool:
    """True while ``pid`` holds a file open under a chunk's scratch directory (mid-encode)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(scratch)) and "musetalk-chunk-" in target:
            return True
    return False


@pytest.mark.slow
def test_chunk_process_killed_mid_chunk_is_retried_and_matches_an_undisturbed_render(
    pipeline_env, instance, astronaut_png, speech_wav, monkeypatch, tmp_path
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    push_template(astronaut_png)
    materialize(instance)
    options = {"batch_size": 2}  # small batches: the chunk takes long enough to be caught mid-way
    put_request("calm", speech_wav, options)
    assert run_render(instance, "calm", tags=TAGS).success

    monkeypatch.setenv("MUSETALK_EXECUTOR", "multiprocess")  # every step in its own process
    monkeypatch.setenv("TMPDIR", str(scratch))  # spawned step processes put their scratch here
    put_request("killed", speech_wav, options)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(run=execute(instance, "killed")))
    worker.start()
    run_id = wait_for("the multiprocess run", lambda: _run_of(instance, "killed"), 60)

    def writing() -> tuple[str, int] | None:
        running = _running_chunk_pids(instance, run_id).items()
        return next(((k, p) for k, p in running if _writing_segment(p, scratch)), None)

    step, pid = wait_for("a render_chunk process writing its segment", writing, 240, every=0.02)
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=300)
    run = outcome["run"]
    assert run.status == dg.DagsterRunStatus.SUCCESS
    attempts = {s.step_key: s.attempts for s in instance.get_run_step_stats(run_id)}
    assert attempts[step] == 2 and all(n == 1 for k, n in attempts.items() if k != step)
    logs = [r.user_message for r in instance.all_logs(run_id)]
    assert any(f"child process for step {step}" in m for m in logs), "the executor reports the kill"

    calm, killed = (decoded_frames(fetch(f"renders/{r}.mp4", tmp_path)) for r in ("calm", "killed"))
    assert calm.shape[0] == expected_frames(speech_wav) and (calm == killed).all()  # CPU: exact
    store = open_store()
    assert store.list("work/") == []
    assert sorted(i.key for i in store.list("renders/")) == [
        f"renders/{r}.{e}" for r in ("calm", "killed") for e in ("json", "mp4")
    ]


# --- a merge_video attempt that died after publishing ------------------------------------------


def test_merge_that_died_after_publishing_is_reported_not_merged_again(
    pipeline_env, instance, astronaut_png, short_speech, monkeypatch
):
    """The worker dies between writing renders/<id>.json and finishing the step (the chunks are already
    deleted): the re-executed merge finds the published video of the same cache, reports it and
    succeeds instead of failing on the missing chunks or writing the video again."""
    from pipelines import jobs as ops

    push_template(astronaut_png)
    materialize(instance)
    submit_request("late", short_speech)
    real_merge = ops._merge

    def merge_then_die(*args):
        real_merge(*args)
        raise RuntimeError("run worker killed after publishing")

    monkeypatch.setattr(ops, "_merge", merge_then_die)
    first = execute(instance, "late")
    assert first.status == dg.DagsterRunStatus.FAILURE
    store = open_store()
    published = {key: store.get_bytes(key) for key in ("renders/late.mp4", "renders/late.json")}
    assert not store.list("work/late/")

    def never(*args):
        raise AssertionError("merged twice")

    monkeypatch.setattr(ops, "_merge", never)
    again = execute(
        instance, "late", reexecution_options=dg.ReexecutionOptions.from_failure(first.run_id, instance)
    )
    assert again.status == dg.DagsterRunStatus.SUCCESS
    assert {key: store.get_bytes(key) for key in published} == published
    materialized = [
        e.event_specific_data.materialization
        for e in events_of(instance, again)
        if e.event_type_value == "ASSET_MATERIALIZATION"
    ]
    assert [(m.partition, m.metadata["frames"].value) for m in materialized] == [
        ("late", expected_frames(short_speech))
    ]

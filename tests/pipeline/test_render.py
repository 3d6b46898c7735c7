"""Template assets and the render_video job, in-process with demo weights, on both store backends."""

import json
import sys
from pathlib import Path

import dagster as dg
import pytest
import soundfile as sf
from helpers import deployment_env

from musetalk_ops import PREPARATION_VERSION
from musetalk_ops.settings import TemplateSettings
from musetalk_ops.store import open_store
from musetalk_ops.template_cache import sha256_file, template_fingerprint
from musetalk_ops.video import probe

FACE_BOX = [177, 66, 272, 175]  # the astronaut's landmark box: no face detector needed
SETTINGS = f"face_box: {FACE_BOX}\nwelcome_text: Hi.\n".encode()
FPS = 25
CHUNK_CONFIG = {"resources": {"render": {"config": {"gpus": 2, "min_chunk_frames": 5}}}}


def expected_frames(wav: Path) -> int:
    info = sf.info(wav)
    assert info.samplerate == 16000
    return info.frames * FPS // 16000


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, monkeypatch, demo_models):
    """The environment a deployment sets, with the store on the local folder or on S3 (moto)."""
    deployment_env(monkeypatch, tmp_path, demo_models)
    if request.param == "s3":
        monkeypatch.setenv("MUSETALK_S3_BUCKET", request.getfixturevalue("s3_bucket"))
        monkeypatch.setenv("MUSETALK_S3_PREFIX", "prod")
    return request.param


local = pytest.mark.parametrize("backend", ["local"], indirect=True)


def push_template(astronaut_png: Path, tid: str = "astro") -> None:
    store = open_store()
    store.put_file(f"templates/{tid}/source.png", astronaut_png)
    store.put_bytes(f"templates/{tid}/settings.yaml", SETTINGS)


def materialize(instance, tid: str = "astro", force: bool = False) -> dg.ExecuteInProcessResult:
    from pipelines.assets import template_cache
    from pipelines.resources import default_resources

    if not instance.has_dynamic_partition("templates", tid):
        instance.add_dynamic_partitions("templates", [tid])
    config = dg.RunConfig(ops={"template_cache": {"config": {"force": force}}})
    return dg.materialize(
        [template_cache],
        partition_key=tid,
        instance=instance,
        resources=default_resources(),
        run_config=config,
    )


def submit_request(rid: str, audio: Path, template: str = "astro") -> None:
    store = open_store()
    store.put_file(f"audio/{rid}.wav", audio)
    store.put_bytes(
        f"requests/{rid}.json", json.dumps({"template": template, "audio": f"audio/{rid}.wav"}).encode()
    )


def render_job():
    """Module-level so that ``reconstructable`` can rebuild it (re-execution)."""
    from pipelines.definitions import build_defs

    return build_defs().get_job_def("render_video")


def failure(result: dg.ExecuteInProcessResult) -> str:
    """The one-line message load_request failed with (a user error: dg.Failure, never retried)."""
    data = result.failure_data_for_node("load_request")
    assert data.user_failure_data is not None, data.error
    return data.user_failure_data.description


def run_render(instance, rid: str, **kwargs) -> dg.ExecuteInProcessResult:
    if not instance.has_dynamic_partition("render_requests", rid):
        instance.add_dynamic_partitions("render_requests", [rid])
    return render_job().execute_in_process(
        partition_key=rid, instance=instance, run_config=CHUNK_CONFIG, **kwargs
    )


@pytest.mark.slow
def test_template_and_render_end_to_end(backend, instance, astronaut_png, short_speech):
    from pipelines.resources import StoreResource
    from pipelines.sensors import render_request_sensor

    push_template(astronaut_png)
    result = materialize(instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    fingerprint = template_fingerprint(
        sha256_file(astronaut_png), TemplateSettings(face_box=FACE_BOX).to_dict(), "demo"
    )
    assert event.partition == "astro" and meta["fingerprint"].value == fingerprint
    assert meta["preparation_version"].value == PREPARATION_VERSION
    assert meta["weights"].value == "demo" and meta["frames"].value == 1 and meta["fps"].value == 25.0
    assert meta["face_size"].value != "no face" and meta["preparation_seconds"].value > 0
    assert meta["preview"].value.startswith("![preview](data:image/jpeg;base64,")
    assert event.materialization.tags["dagster/data_version"] == fingerprint
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"faces_present": True, "cache_loadable": True}
    store = open_store()
    assert store.exists(f"cache/templates/astro/{fingerprint}/manifest.json")
    assert json.loads(store.get_bytes(f"cache/templates/astro/{fingerprint}/manifest.json"))["id"] == "astro"
    pointer = json.loads(store.get_bytes("cache/templates/astro/current.json"))  # what workers resolve
    assert pointer == {"template": "astro", "fingerprint": fingerprint, "weights": "demo"}

    submit_request("req-1", short_speech)
    with dg.build_sensor_context(instance=instance, resources={"store": StoreResource()}) as context:
        (run_request,) = render_request_sensor(context).run_requests
    instance.add_dynamic_partitions("render_requests", [run_request.partition_key])
    result = run_render(instance, run_request.partition_key, tags=run_request.tags)
    assert result.success

    frames = expected_frames(short_speech)
    chunks = result.output_for_node("render_chunk")
    assert sorted(chunks) == ["c0000", "c0001"]
    assert [(c.chunk.start, c.chunk.stop) for c in sorted(chunks.values(), key=lambda c: c.chunk.index)] == [
        (0, frames // 2),
        (frames // 2, frames),
    ]
    local_copy = Path(instance.root_directory) / "out.mp4"
    store.get_file("renders/req-1.mp4", local_copy)
    info = probe(local_copy)
    assert (info.width, info.height, info.frames, info.fps) == (512, 512, frames, 25.0)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.keyframe_at_start
    assert abs(info.audio_duration - frames / FPS) < 0.05
    timings = json.loads(store.get_bytes("renders/req-1.json"))
    assert timings["frames"] == frames and timings["chunks"] == 2 and timings["weights"] == "demo"
    assert timings["video_seconds"] == pytest.approx(frames / FPS)
    assert all(timings[s] > 0 for s in ("audio_features", "unet", "vae_decode", "encode", "mux", "total"))
    assert timings["fingerprint"] == fingerprint and timings["template"] == "astro"
    assert timings["source"] == "run" and timings["run_id"] == result.run_id
    assert timings["signer"] is None  # no certificate configured: delivered unsigned
    assert store.list("work/") == []  # intermediates removed

    (video,) = result.asset_materializations_for_node("merge_video")
    assert video.asset_key == dg.AssetKey("rendered_video") and video.partition == "req-1"
    assert (
        video.metadata["cache_fingerprint"].value == fingerprint
        and video.metadata["template"].value == "astro"
    )
    observed = instance.fetch_observations(dg.AssetKey("template_cache"), limit=5).records
    assert [r.asset_observation.metadata["used_by_request"].value for r in observed] == ["req-1"]
    if backend == "s3":  # step outputs went through the S3 IO manager, under the deployment's prefix
        assert store.uri("x") == f"s3://{store.bucket}/prod/x"
        outputs = [i.key for i in store.list("dagster/storage/")]
        assert any(k.endswith(f"{result.run_id}/load_request/result") for k in outputs)


@pytest.mark.slow
@local
def test_template_cache_is_not_prepared_twice(backend, instance, astronaut_png):
    push_template(astronaut_png)
    assert len(materialize(instance).get_asset_materialization_events()) == 1

    again = materialize(instance)
    assert again.success and again.get_asset_materialization_events() == []  # unchanged: no work
    assert {c.check_name: c.passed for c in again.get_asset_check_evaluations()} == {
        "faces_present": True,
        "cache_loadable": True,
    }

    store = open_store()
    (manifest,) = [i.key for i in store.list("cache/templates/astro/") if i.key.endswith("manifest.json")]
    store.delete(manifest)  # the bucket lost the cache: the instance's record is not enough
    rebuilt = materialize(instance)
    assert len(rebuilt.get_asset_materialization_events()) == 1 and store.exists(manifest)

    assert len(materialize(instance, force=True).get_asset_materialization_events()) == 1

    store.put_bytes("templates/astro/settings.yaml", SETTINGS + b"extra_margin: 12\n")
    changed = materialize(instance)
    (event,) = changed.get_asset_materialization_events()
    assert event.materialization.metadata["fingerprint"].value != manifest.split("/")[3]


@local
def test_bad_requests_fail_cleanly(backend, instance, short_speech):
    """Failures name the problem and leave no output; nothing is retried."""
    store = open_store()
    submit_request("no-template", short_speech, template="nobody")
    failed = run_render(instance, "no-template", raise_on_error=False)
    assert not failed.success
    assert "template 'nobody' is unknown or not prepared" in failure(failed)

    instance.add_dynamic_partitions("templates", ["ghost"])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "template_cache",
            partition="ghost",
            metadata={"fingerprint": "0123456789abcdef", "weights": "demo"},
        )
    )
    submit_request("ghost-cache", short_speech, template="ghost")
    failed = run_render(instance, "ghost-cache", raise_on_error=False)
    assert "cache/templates/ghost/0123456789abcdef/ is missing from the store" in failure(failed)

    store.put_bytes(
        "cache/templates/ghost/0123456789abcdef/manifest.json",
        json.dumps({"model": {"version": "v15"}, "fps": 25.0}).encode(),
    )
    store.put_bytes(
        "requests/no-audio.json", json.dumps({"template": "ghost", "audio": "audio/no-audio.wav"}).encode()
    )
    failed = run_render(instance, "no-audio", raise_on_error=False)
    assert "audio/no-audio.wav does not exist" in failure(failed)

    store.put_bytes(
        "requests/sneaky.json", json.dumps({"template": "ghost", "audio": "../secret.wav"}).encode()
    )
    failed = run_render(instance, "sneaky", raise_on_error=False)
    assert "audio '../secret.wav'" in failure(failed)

    failed = run_render(instance, "Bad.Id", raise_on_error=False)  # a partition added by hand
    assert "invalid request id 'Bad.Id'" in failure(failed)
    assert store.list("renders/") == [] and store.list("work/") == []


@pytest.mark.slow
@local
def test_reexecution_rerenders_only_missing_chunks_and_stats_count_requests_once(
    backend, instance, astronaut_png, short_speech, monkeypatch, tmp_path
):
    from musetalk_ops import errors, video
    from musetalk_ops.render import chunks as chunk_api
    from pipelines.graphql import GraphQLClient
    from pipelines.stats import collect_stats, format_stats

    push_template(astronaut_png)
    materialize(instance)
    submit_request("flaky", short_speech)
    instance.add_dynamic_partitions("render_requests", ["flaky"])
    rendered: list[int] = []
    real_render, real_mux = chunk_api.render_chunk, video.mux
    broken = {"chunk": True, "merge": True}

    def render_chunk(models, template, features, start, stop, *args, **kwargs):
        if start > 0 and broken["chunk"]:
            raise errors.InputError("injected failure of a later chunk")
        rendered.append(start)
        return real_render(models, template, features, start, stop, *args, **kwargs)

    def mux(*args, **kwargs):
        if broken["merge"]:
            raise errors.InputError("injected: merge failed")
        return real_mux(*args, **kwargs)

    monkeypatch.setattr(chunk_api, "render_chunk", render_chunk)
    monkeypatch.setattr("pipelines.jobs.mux", mux)
    job = dg.reconstructable(render_job)
    tags = {"dagster/partition": "flaky", "musetalk/template": "astro"}

    def execute(**kwargs) -> dg.DagsterRun:  # execute_job does not copy the parent's tags and config
        with dg.execute_job(job, instance, CHUNK_CONFIG, tags, raise_on_error=False, **kwargs) as result:
            return result.dagster_run

    first = execute()
    assert first.status == dg.DagsterRunStatus.FAILURE and rendered == [0]
    store = open_store()
    assert [i.key for i in store.list("work/flaky/chunks/")] == [
        "work/flaky/chunks/0000.json",
        "work/flaky/chunks/0000.mp4",
    ]

    broken["chunk"] = False  # every step again (a full re-execution): the uploaded chunk is reused
    second = execute(reexecution_options=dg.ReexecutionOptions(parent_run_id=first.run_id))
    half = expected_frames(short_speech) // 2
    assert second.status == dg.DagsterRunStatus.FAILURE and rendered == [0, half]

    broken["merge"] = False  # from failure: only the merge runs
    third = execute(reexecution_options=dg.ReexecutionOptions.from_failure(second.run_id, instance))
    assert third.status == dg.DagsterRunStatus.SUCCESS and rendered == [0, half]
    out = tmp_path / "flaky.mp4"
    store.get_file("renders/flaky.mp4", out)
    assert probe(out).frames == expected_frames(short_speech)
    timings = json.loads(store.get_bytes("renders/flaky.json"))
    assert timings["frames"] == expected_frames(short_speech)

    submit_request("doomed", short_speech, template="nobody")
    run_render(instance, "doomed", raise_on_error=False, tags={"musetalk/template": "nobody"})
    store.put_bytes("requests/rejected/bad.json", b"{}")
    stats = collect_stats(instance, store, client=GraphQLClient("http://127.0.0.1:9", timeout=0.5))
    assert (stats["totalRequests"], stats["completedRequests"], stats["failedRequests"]) == (2, 1, 1)
    assert stats["completionRate"] == "50.00%" and stats["completionRatio"] == 0.5
    assert stats["rejectedRequests"] == 1
    assert stats["templateUsage"] == {"astro": 1, "nobody": 1}
    assert stats["renderModes"] == {"reference": 1}  # the CPU default, per rendered video
    assert "\npaths      reference: 1\n" in format_stats(stats)
    assert stats["renders"] == 1 and stats["stages"]["total"]["p50"] == pytest.approx(
        timings["total"], abs=1e-3
    )
    assert stats["rtf"]["p50"] == pytest.approx(timings["rtf"], abs=1e-3)
    assert stats["status"]["weights"] == "demo" and "unreachable" in stats["status"]["codeLocation"]


@pytest.mark.slow
@local
def test_welcome_video_from_text_and_from_audio(backend, instance, astronaut_png, short_speech):
    from pipelines.assets import welcome_video
    from pipelines.resources import default_resources

    def welcome() -> tuple[dg.AssetMaterialization, int]:
        result = dg.materialize(
            [welcome_video], partition_key="astro", instance=instance, resources=default_resources()
        )
        (event,) = result.get_asset_materialization_events()
        out = Path(instance.root_directory) / "welcome.mp4"
        open_store().get_file(f"welcome/astro/{fingerprint}.mp4", out)
        info = probe(out)
        assert info.audio_codec == "aac" and info.frames == event.materialization.metadata["frames"].value
        return event.materialization, info.frames

    push_template(astronaut_png)
    fingerprint = (
        materialize(instance)
        .get_asset_materialization_events()[0]
        .materialization.metadata["fingerprint"]
        .value
    )
    spoken, frames = welcome()  # settings.yaml: welcome_text: Hi. (espeak-ng, the default command)
    assert spoken.metadata["spoken"].value == "text: Hi." and frames > 5

    store = open_store()
    store.put_file("templates/astro/hello.wav", short_speech)
    store.put_bytes(
        "templates/astro/settings.yaml", f"face_box: {FACE_BOX}\nwelcome_audio: hello.wav\n".encode()
    )
    recorded, frames = welcome()
    assert recorded.metadata["spoken"].value == "audio hello.wav" and frames == expected_frames(short_speech)


def test_text_to_speech_gets_the_text_as_one_argument(tmp_path):
    """No shell: quotes, semicolons and a leading dash arrive verbatim in one argv element."""
    from musetalk_ops.errors import InputError
    from pipelines.assets import speak

    text = "-w /etc/passwd; rm -rf ~ $(reboot) 'quoted' \"double\""
    writer = [
        sys.executable,
        "-c",
        "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
        "{out}",
        "{text}",
    ]
    out = speak(writer, text, tmp_path / "out.txt")
    assert out.read_text() == text
    with pytest.raises(InputError, match="must contain"):
        speak(["espeak-ng", "{text}"], "hi", tmp_path / "x.wav")
    with pytest.raises(InputError, match="not found"):
        speak(["no-such-tts-program", "{out}", "{text}"], "hi", tmp_path / "x.wav")


def test_percentiles_match_numpy_definition():
    from pipelines.stats import percentiles

    values = [0.5, 2.0, 1.0, 4.0, 3.0]
    assert percentiles(values) == {"p50": 2.0, "p95": pytest.approx(3.8)}
    assert percentiles([]) == {"p50": None, "p95": None}

"""The ``render_video`` job: one run per render request, chunks fanned out over GPUs.

load_request → audio_features → plan_chunks ─┬► render_chunk ─┐
                                             └► render_chunk ─┴► merge_video → renders/<id>.mp4

Steps pass small frozen records (``pipelines.records``); frames and features travel as objects in the
store (``work/<id>/``), so each step can run in its own process or pod. The engine (torch) is imported
inside the steps that render, so the code location and the other steps stay light.
"""

import json
import tempfile
import time
from pathlib import Path

import dagster as dg

from musetalk_ops import keys
from musetalk_ops.config import Limits
from musetalk_ops.credentials import Provenance, timed_sign
from musetalk_ops.errors import CacheError, InputError
from musetalk_ops.render_records import render_record, write_render_record
from musetalk_ops.store import Store
from musetalk_ops.template_store import load_cached_template, stored_manifest
from musetalk_ops.timings import Timings
from musetalk_ops.video import GENERATED_COMMENT, mux
from pipelines.catalog import latest_cache, render_events, user_errors
from pipelines.executors import GPU_OP_TAGS, WEIGHTS_OP_TAGS
from pipelines.partitions import render_requests
from pipelines.records import Chunk, Features, RenderedChunk, Request
from pipelines.request import parse_request
from pipelines.resources import GpuSlots, RenderResource, StoreResource


@dg.op(description="Read and validate requests/<partition>.json and find its template's current cache.")
def load_request(context: dg.OpExecutionContext, store: StoreResource) -> Request:
    rid = context.partition_key
    client = store.get()
    with user_errors():
        request = parse_request(rid, client.get_bytes(keys.request(rid)))
        tid = request.template
        ref = latest_cache(context.instance, tid)
        if ref is None:
            raise InputError(
                f"request {rid}: template {tid!r} is unknown or not prepared "
                f"(no template_cache materialization for partition {tid!r})"
            )
        if not client.exists(ref.manifest):
            raise InputError(
                f"request {rid}: template cache {client.uri(ref.prefix)} is missing from the "
                f"store: re-materialize template_cache partition {tid!r}"
            )
        if not client.exists(request.audio):
            raise InputError(f"request {rid}: audio object {client.uri(request.audio)} does not exist")
        manifest = stored_manifest(client, ref)
        if manifest is None:
            raise CacheError(
                f"request {rid}: template cache {client.uri(ref.prefix)} has a damaged manifest.json: "
                f"re-materialize template_cache partition {tid!r}"
            )
    context.log.info(f"request {rid}: template {tid} cache {ref.fingerprint} (weights {ref.weights})")
    return Request(
        id=rid,
        template=tid,
        audio=request.audio,
        options=request.options,
        cache=ref,
        version=manifest["model"]["version"],
        weights=manifest["model"]["weights"],
        fps=float(request.options.get("fps") or manifest["fps"]),
    )


@dg.op(
    tags=WEIGHTS_OP_TAGS,
    description="Whisper features of the whole request, computed once and stored for every chunk.",
)
def audio_features(
    context: dg.OpExecutionContext, store: StoreResource, render: RenderResource, request: Request
) -> Features:
    from musetalk_ops.render.models import compute_features, load_render_models

    client = store.get()
    with user_errors(), tempfile.TemporaryDirectory(prefix="musetalk-audio-") as tmp:
        audio = Path(tmp) / Path(request.audio).name
        client.get_file(request.audio, audio)
        start = time.perf_counter()
        settings = render.render_settings(**request.options)
        models = load_render_models(settings, version=request.version, components=("whisper",))
        loaded = time.perf_counter()
        features = compute_features(models, audio, Limits.from_env())
        computed = time.perf_counter()
        frames = features.num_frames(request.fps)
        if frames == 0:
            raise InputError(f"request {request.id}: the audio is shorter than one video frame")
        path = Path(tmp) / "features.safetensors"
        features.save(path)
        client.put_file(keys.work_features(request.id), path)
    context.log.info(f"{features.duration:.2f} s of audio → {frames} frames at {request.fps:g} fps")
    return Features(
        key=keys.work_features(request.id),
        frames=frames,
        video_seconds=frames / request.fps,
        audio_features=computed - loaded,
        load=loaded - start,
    )


@dg.op(
    out=dg.DynamicOut(Chunk),
    description="Equal contiguous frame ranges, one per GPU, each ≥ min_chunk_frames.",
)
def plan_chunks(context: dg.OpExecutionContext, render: RenderResource, features: Features):
    from musetalk_ops.render.chunks import plan_chunks as frame_ranges

    with user_errors():
        ranges = frame_ranges(features.frames, render.gpu_count(), render.min_chunk_frames)
    context.log.info(f"{features.frames} frames in {len(ranges)} chunk(s): {ranges}")
    for index, (start, stop) in enumerate(ranges):
        yield dg.DynamicOutput(
            Chunk(index, start, stop),
            mapping_key=f"c{index:04d}",
            metadata={"frames": stop - start},
        )


def _chunk_done(client: Store, key: str, request: Request, chunk: Chunk) -> RenderedChunk | None:
    """The record of this very chunk from an earlier attempt, if its segment was uploaded."""
    marker = key.removesuffix(".mp4") + ".json"
    if not (client.exists(marker) and client.exists(key)):
        return None
    done = json.loads(client.get_bytes(marker))
    same = (done.get("fingerprint"), done.get("start"), done.get("stop")) == (
        request.cache.fingerprint,
        chunk.start,
        chunk.stop,
    )
    return RenderedChunk.from_json(done, reused=True) if same else None


@dg.op(
    tags=GPU_OP_TAGS,
    pool="gpu",
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL),
    description="Render one frame range to an H.264 segment under work/<id>/chunks/ (skipped when an "
    "earlier attempt already uploaded it).",
)
def render_chunk(
    context: dg.OpExecutionContext,
    store: StoreResource,
    render: RenderResource,
    gpu_slots: GpuSlots,
    request: Request,
    features: Features,
    chunk: Chunk,
) -> RenderedChunk:
    from musetalk_ops.audio import AudioFeatures
    from musetalk_ops.render.chunks import render_chunk as render_frames
    from musetalk_ops.render.models import load_render_models

    client = store.get()
    key = keys.work_chunk(request.id, chunk.index)
    with user_errors():
        done = _chunk_done(client, key, request, chunk)
        if done is not None:
            context.log.info(
                f"chunk {chunk.index} [{chunk.start}, {chunk.stop}) already rendered: reusing {key}"
            )
            return done
        with gpu_slots.slot(context.log), tempfile.TemporaryDirectory(prefix="musetalk-chunk-") as tmp:
            start = time.perf_counter()
            settings = render.render_settings(**request.options)
            models = load_render_models(settings, version=request.version, components=("unet", "vae"))
            template = load_cached_template(client, request.cache)
            client.get_file(features.key, Path(tmp) / "features.safetensors")
            audio = AudioFeatures.load(Path(tmp) / "features.safetensors")
            loaded = time.perf_counter() - start
            result = render_frames(
                models,
                template,
                audio,
                chunk.start,
                chunk.stop,
                Path(tmp) / "chunk.mp4",
                settings,
                on_retry=context.log.warning,
            )
            result.timings.load += loaded
            client.put_file(key, result.path)
        record = RenderedChunk(chunk, key, request.cache.fingerprint, result.timings.to_dict())
        marker = key.removesuffix(".mp4") + ".json"
        client.put_bytes(marker, json.dumps(record.to_json()).encode())
    context.log.info(
        f"chunk {chunk.index}: {result.frames} frames in {result.timings.total:.2f} s "
        f"(+{loaded:.2f} s load) on {result.timings.device}, mode {result.timings.mode}"
    )
    return record


def request_timings(
    features: Features, chunks: list[RenderedChunk], mux_seconds: float, total: float
) -> Timings:
    """The request's timings (docs/timings.md §2): stage seconds summed over steps, total = run wall time."""
    first = chunks[0].timings
    timings = Timings(
        device=first["device"],
        dtype=first["dtype"],
        batch_size=first["batch_size"],
        weights=first["weights"],
        mode=first.get("mode", ""),  # chunks written before the field existed have none
        video_seconds=features.video_seconds,
    )
    for chunk in chunks:
        timings.merge(Timings.from_dict(chunk.timings))
    timings.audio_features += features.audio_features
    timings.load += features.load
    timings.mux += mux_seconds
    timings.total = total
    return timings


def _merged_before(client: Store, request: Request) -> dict | None:
    """The timings summary of an earlier attempt that already wrote this request's video from the same
    cache, else None. The video is uploaded before the summary, so a summary means both are complete."""
    timings_key = keys.render_timings(request.id)
    if not (client.exists(timings_key) and client.exists(keys.render_video(request.id))):
        return None
    summary = json.loads(client.get_bytes(timings_key))
    return summary if summary.get("fingerprint") == request.cache.fingerprint else None


def _merge(
    context: dg.OpExecutionContext,
    client: Store,
    request: Request,
    features: Features,
    chunks: list[RenderedChunk],
) -> dict:
    """Join the chunk segments with the request's audio into renders/<id>.mp4, then write its timings
    summary (last: it marks the request done), then drop the request's work objects."""
    rid, tid = request.id, request.template
    video_key = keys.render_video(rid)
    with tempfile.TemporaryDirectory(prefix="musetalk-merge-") as tmp:
        segments = []
        for chunk in chunks:
            segments.append(Path(tmp) / f"{chunk.chunk.index:04d}.mp4")
            client.get_file(chunk.key, segments[-1])
        audio = Path(tmp) / Path(request.audio).name
        client.get_file(request.audio, audio)
        out = Path(tmp) / "out.mp4"
        start = time.perf_counter()
        mux(segments, audio, out, comment=GENERATED_COMMENT)
        mux_seconds = time.perf_counter() - start
        signed = Timings()
        provenance = Provenance(request.version, request.weights, tid, request.cache.fingerprint, rid)
        identity = timed_sign(out, provenance, signed)
        client.put_file(video_key, out)
        run_start = context.instance.get_run_stats(context.run_id).start_time or time.time()
        timings = request_timings(features, chunks, mux_seconds, time.time() - run_start)
        timings.merge(signed)
        summary = render_record(
            timings,
            rid=rid,
            template=tid,
            fingerprint=request.cache.fingerprint,
            source="run",
            signer=identity.subject if identity else None,
            chunks=len(chunks),
            run_id=context.run_id,
        )
        write_render_record(client, summary)
        client.delete_prefix(keys.work_prefix(rid))
    return summary


@dg.op(description="Join the segments without re-encoding, add AAC, publish renders/<id>.mp4 + .json.")
def merge_video(
    context: dg.OpExecutionContext,
    store: StoreResource,
    request: Request,
    features: Features,
    chunks: list[RenderedChunk],
) -> dict:
    client = store.get()
    rid = request.id
    video_key, timings_key = keys.render_video(rid), keys.render_timings(rid)
    with user_errors():
        summary = _merged_before(client, request)
        if summary is not None:  # an attempt died after writing the video: report it, never merge twice
            context.log.info(f"{client.uri(video_key)} was written by run {summary['run_id']}: reusing it")
            client.delete_prefix(keys.work_prefix(rid))
        else:
            summary = _merge(context, client, request, features, sorted(chunks, key=lambda c: c.chunk.index))
    timings = Timings.from_dict(summary)
    extra = {"chunks": len(chunks), "reused_chunks": sum(c.reused for c in chunks)}
    for event in render_events(client, summary, run_id=context.run_id, **extra):
        context.log_event(event)
    context.log.info(
        f"wrote {client.uri(video_key)}: {timings.frames} frames, {timings.total:.2f} s, "
        f"rtf {timings.rtf:.2f}"
    )
    return {"video": video_key, "timings": timings_key}


@dg.job(
    partitions_def=render_requests,
    description="Render one request (partition = request id) into renders/<id>.mp4.",
    tags={"musetalk/pipeline": "render"},
)
def render_video():
    request = load_request()
    features = audio_features(request)
    chunks = plan_chunks(features).map(lambda chunk: render_chunk(request, features, chunk))
    merge_video(request, features, chunks.collect())

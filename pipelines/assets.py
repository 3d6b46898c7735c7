"""Template assets: the preprocessed ``template_cache`` and the ``welcome_video`` of each template, plus
the ``rendered_video`` spec that render runs materialize (lineage: rendered_video ← template_cache).

A template cache lives in the store under ``cache/templates/<id>/<fingerprint>/``; the fingerprint
names every input (source, settings, weights, preparation version), so a changed template gets a new
directory and an unchanged one is not prepared again.
"""

import base64
import io
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from musetalk_ops import __version__, keys
from musetalk_ops.config import models_dir
from musetalk_ops.errors import InputError, MuseTalkError
from musetalk_ops.files import sha256_file
from musetalk_ops.settings import TemplateSettings, load_settings
from musetalk_ops.store import Store
from musetalk_ops.template_store import (
    CacheRef,
    download_cache,
    local_cache,
    stored_manifest,
    upload_cache,
    write_pointer,
)
from musetalk_ops.timings import Timings
from pipelines.catalog import TEMPLATE_CACHE, latest_cache, user_errors
from pipelines.executors import GPU_OP_TAGS
from pipelines.partitions import render_requests, templates
from pipelines.resources import RenderResource, StoreResource

CODE_VERSION = __version__
FACES_CHECK = "faces_present"
LOADABLE_CHECK = "cache_loadable"
PREVIEW_WIDTH = 256  # embedded in the metadata: keep the event log small


class TemplateCacheConfig(dg.Config):
    force: bool = Field(default=False, description="prepare again even if an identical cache exists")


def _template_inputs(store: Store, tid: str, tmp: Path) -> tuple[Path, TemplateSettings]:
    """Download ``templates/<tid>/source.<ext>`` and its optional settings.yaml (validated)."""
    found = {
        info.key.removeprefix(keys.template_prefix(tid)) for info in store.list(keys.template_prefix(tid))
    }
    sources = sorted(name for name in found if name.startswith("source."))
    if len(sources) != 1:
        raise InputError(
            f"template {tid}: expected one {store.uri(keys.template_prefix(tid))}source.<ext>, "
            f"found {len(sources)}"
        )
    source = tmp / sources[0]
    store.get_file(keys.template_prefix(tid) + sources[0], source)
    if "settings.yaml" not in found:
        return source, TemplateSettings()
    local = tmp / "settings.yaml"
    store.get_file(keys.template_settings(tid), local)
    try:
        return source, load_settings(local)
    except InputError as e:
        raise InputError(str(e).replace(str(local), store.uri(keys.template_settings(tid)))) from None


def _preview_markdown(png: bytes) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((PREVIEW_WIDTH, PREVIEW_WIDTH))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return f"![preview](data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def _faces_check(manifest: dict) -> dg.AssetCheckResult:
    missing = [i for i, face in enumerate(manifest["faces"]) if face is None]
    policy = manifest["settings"].get("no_face", "error")
    return dg.AssetCheckResult(
        check_name=FACES_CHECK,
        passed=not missing or policy == "passthrough",
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "frames": manifest["frames"],
            "frames_without_face": len(missing),
            "first_without_face": missing[0] if missing else -1,
            "no_face_policy": policy,
        },
    )


def _loadable_check(store: Store, ref: CacheRef, manifest: dict, load: bool) -> dg.AssetCheckResult:
    """Every file the manifest names is in the store; with ``load``, a downloaded copy also reads back."""
    from musetalk_ops.template_cache import PREVIEW, read_cache

    listed = {info.key.removeprefix(ref.prefix): info.size for info in store.list(ref.prefix)}
    needed = [manifest["source"]["file"], "latents.safetensors", "masks.npz", PREVIEW, keys.MANIFEST]
    missing = [name for name in needed if not listed.get(name)]
    metadata: dict = {"files": len(listed), "missing": ", ".join(missing) or "none", "loaded": load}
    if not missing and load:
        with tempfile.TemporaryDirectory(prefix="musetalk-check-") as tmp:
            try:
                template = read_cache(download_cache(store, ref, Path(tmp) / "cache"))
                metadata["loaded_frames"] = len(template.frames)
                missing = [] if len(template.frames) == manifest["frames"] else ["frames"]
            except MuseTalkError as e:
                metadata["error"] = str(e)
                missing = ["loadable"]
    return dg.AssetCheckResult(check_name=LOADABLE_CHECK, passed=not missing, metadata=metadata)


def _cache_metadata(
    store: Store, ref: CacheRef, manifest: dict, weights_fp: str, prepared: Timings | None
) -> dict:
    from musetalk_ops.template_cache import PREVIEW

    boxes = [f["face_box"] for f in manifest["faces"] if f is not None]
    width, height = manifest["frame_size"]
    metadata = {
        "fingerprint": ref.fingerprint,
        "preparation_version": manifest.get("preparation_version"),
        "weights": ref.weights,
        "weights_fingerprint": weights_fp,
        "uri": store.uri(ref.prefix),
        "frames": manifest["frames"],
        "fps": dg.MetadataValue.float(manifest["fps"]),
        "frame_size": f"{width}x{height}",
        "face_size": (
            f"{statistics.median(b[2] - b[0] for b in boxes):.0f}x"
            f"{statistics.median(b[3] - b[1] for b in boxes):.0f}"
        )
        if boxes
        else "no face",
        "frames_without_face": manifest["frames"] - len(boxes),
        "cycle": manifest["cycle"],
        "mask_source": manifest["mask_source"],
        "version": manifest["model"]["version"],
        "preview": dg.MetadataValue.md(_preview_markdown(store.get_bytes(ref.prefix + PREVIEW))),
        "preview_uri": store.uri(ref.prefix + PREVIEW),
    }
    if prepared is not None:
        metadata["preparation_seconds"] = dg.MetadataValue.float(round(prepared.total, 3))
        stages = {"load": prepared.load, **prepared.extra}
        metadata["preparation_stages"] = dg.MetadataValue.json({k: round(v, 4) for k, v in stages.items()})
    return metadata


@dg.asset(
    partitions_def=templates,
    code_version=CODE_VERSION,
    group_name="templates",
    kinds={"pytorch"},
    output_required=False,
    op_tags=GPU_OP_TAGS,
    pool="gpu",
    check_specs=[
        dg.AssetCheckSpec(
            FACES_CHECK,
            asset="template_cache",
            description="A face in every frame, or the template's no_face: passthrough policy applied",
        ),
        dg.AssetCheckSpec(
            LOADABLE_CHECK,
            asset="template_cache",
            blocking=True,
            description="Every cache file is in the store and a downloaded copy loads",
        ),
    ],
    description="Preprocessed template (face boxes, VAE latents, blending masks) in "
    "cache/templates/<id>/<fingerprint>/.",
)
def template_cache(
    context: dg.AssetExecutionContext,
    config: TemplateCacheConfig,
    store: StoreResource,
    render: RenderResource,
):
    from musetalk_ops.models.layout import weights_kind
    from musetalk_ops.prepare import prepare_template, weights_id
    from musetalk_ops.template_cache import template_fingerprint

    tid = context.partition_key
    client = store.get()
    with user_errors(), tempfile.TemporaryDirectory(prefix="musetalk-template-") as tmp:
        source, settings = _template_inputs(client, tid, Path(tmp))
        root = models_dir(render.models_dir)
        weights_fp = weights_id(root, settings)
        fingerprint = template_fingerprint(sha256_file(source), settings.to_dict(), weights_fp)
        ref = CacheRef(tid, fingerprint, weights_kind(root))
        stored = client.exists(ref.manifest)
        previous = latest_cache(context.instance, tid)
        if stored and not config.force and previous is not None and previous.fingerprint == fingerprint:
            manifest = stored_manifest(client, ref)
            loadable = _loadable_check(client, ref, manifest, load=True) if manifest else None
            if loadable is not None and loadable.passed:
                context.log.info(f"template {tid} unchanged (cache {fingerprint} loads): nothing to do")
                write_pointer(client, ref)  # caches from before the pointer existed get one
                yield _faces_check(manifest)
                yield loadable
                return
            why = "unreadable manifest.json"
            if loadable is not None:  # "error" (did not load) is more precise than "missing" (files)
                why = next(loadable.metadata[k].value for k in ("error", "missing") if k in loadable.metadata)
            context.log.warning(f"cache {client.uri(ref.prefix)} is damaged ({why}): preparing it again")
            client.delete(ref.manifest)  # invisible until the repaired cache is complete
            stored = False
        prepared = None
        if stored and not config.force:
            context.log.info(f"cache {fingerprint} of template {tid} is already in the store: recording it")
        else:
            prepared = Timings()
            start = time.perf_counter()
            local = prepare_template(
                source,
                Path(tmp) / "cache",
                template_id=tid,
                settings=settings,
                models_root=root,
                device=render.device,
                dtype=render.dtype,
                force=True,
                timings=prepared,
            )
            prepared.total = time.perf_counter() - start
            upload_cache(client, local, ref.prefix)
            context.log.info(f"prepared template {tid} in {prepared.total:.1f} s → {client.uri(ref.prefix)}")
        manifest = json.loads(client.get_bytes(ref.manifest))
        metadata = _cache_metadata(client, ref, manifest, weights_fp, prepared)
        checks = [_faces_check(manifest), _loadable_check(client, ref, manifest, load=True)]
        if checks[1].passed:  # last: workers find only a cache that loads
            write_pointer(client, ref)
            context.log.info(f"{client.uri(keys.template_pointer(tid))} → cache {fingerprint}")
    yield dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(fingerprint), check_results=checks
    )


class WelcomeConfig(dg.Config):
    tts_command: list[str] = Field(
        default=["espeak-ng", "-v", "en-us", "-w", "{out}", "--", "{text}"],
        description="text-to-speech argv, run without a shell: {out} = WAV to write, {text} = the text "
        "(one argument)",
    )
    default_text: str = Field(
        default="Hello! Nice to meet you.",
        description="spoken when the template has neither welcome_audio nor welcome_text",
    )


def speak(command: list[str], text: str, out: Path) -> Path:
    """Run the text-to-speech command (no shell; the text is one argument) and return the WAV."""
    if not any("{out}" in arg for arg in command) or not any("{text}" in arg for arg in command):
        raise InputError(f"tts_command {command!r} must contain {{out}} and {{text}}")
    argv = [arg.replace("{out}", str(out)).replace("{text}", text) for arg in command]
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
    except FileNotFoundError:
        raise InputError(
            f"text-to-speech program {argv[0]!r} not found (install espeak-ng or set tts_command)"
        ) from None
    except subprocess.CalledProcessError as e:
        detail = e.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {e.returncode}"]
        raise InputError(f"text-to-speech {argv[0]} failed: {detail[0]}") from None
    if not out.is_file() or out.stat().st_size == 0:
        raise InputError(f"text-to-speech {argv[0]} wrote no audio to {out}")
    return out


@dg.asset(
    partitions_def=templates,
    deps=[template_cache],
    code_version=CODE_VERSION,
    group_name="templates",
    kinds={"pytorch"},
    op_tags=GPU_OP_TAGS,
    pool="gpu",
    description="The template greeting: its welcome_audio, or welcome_text spoken by tts_command, rendered "
    "to welcome/<id>/<fingerprint>.mp4.",
)
def welcome_video(
    context: dg.AssetExecutionContext, config: WelcomeConfig, store: StoreResource, render: RenderResource
) -> dg.MaterializeResult:
    from musetalk_ops.credentials import configured_identity
    from musetalk_ops.render.file import render_file

    tid = context.partition_key
    client = store.get()
    with user_errors(), tempfile.TemporaryDirectory(prefix="musetalk-welcome-") as tmp:
        ref = latest_cache(context.instance, tid)
        if ref is None:
            raise InputError(f"template {tid!r} has no template_cache materialization: materialize it first")
        _source, settings = _template_inputs(client, tid, Path(tmp))
        if settings.welcome_audio:
            audio = Path(tmp) / f"welcome{Path(settings.welcome_audio).suffix}"
            client.get_file(keys.template_prefix(tid) + settings.welcome_audio, audio)
            spoken = f"audio {settings.welcome_audio}"
        else:
            text = settings.welcome_text or config.default_text
            audio = speak(config.tts_command, text, Path(tmp) / "welcome.wav")
            spoken = f"text: {text}"
        out = Path(tmp) / "welcome.mp4"
        timings = render_file(local_cache(client, ref), audio, out, render.render_settings(), progress=False)
        signer = configured_identity()  # the one render_file signed with, if any
        key = keys.welcome_video(tid, ref.fingerprint)
        client.put_file(key, out)
        audio_sha = sha256_file(audio)
    context.log.info(f"welcome video of {tid} ({spoken}) → {client.uri(key)}")
    return dg.MaterializeResult(
        metadata={
            "uri": client.uri(key),
            "cache_fingerprint": ref.fingerprint,
            "spoken": spoken,
            "frames": timings.frames,
            "video_seconds": dg.MetadataValue.float(round(timings.video_seconds, 3)),
            "total_seconds": dg.MetadataValue.float(round(timings.total, 3)),
            "weights": timings.weights,
            "signer": signer.subject if signer else "unsigned",
            "timings": dg.MetadataValue.json(timings.to_dict()),
        },
        data_version=dg.DataVersion(f"{ref.fingerprint}-{audio_sha[:16]}"),
    )


rendered_video = dg.AssetSpec(
    "rendered_video",
    deps=[TEMPLATE_CACHE],
    partitions_def=render_requests,
    group_name="renders",
    kinds={"video"},
    description="renders/<request id>.mp4, materialized by the render_video job (one partition per request); "
    "metadata: timings, template id and the template cache fingerprint used.",
)

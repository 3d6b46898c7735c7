"""A whole clip to one MP4 (the CLI's path): template, models and features, one chunk, mux with audio."""

import os
import sys
import tempfile
import time
from pathlib import Path

from musetalk_ops.audio import AudioFeatures
from musetalk_ops.config import Limits
from musetalk_ops.credentials import configured_identity, template_provenance, timed_sign
from musetalk_ops.errors import InputError
from musetalk_ops.models import Models
from musetalk_ops.render.chunks import render_chunk
from musetalk_ops.render.models import compute_features, load_render_models
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.render.template import open_template
from musetalk_ops.template_cache import Template
from musetalk_ops.timings import Timings
from musetalk_ops.video import GENERATED_COMMENT, fps_fraction, mux


def render_file(
    template_path: Path,
    audio_path: Path,
    out_path: Path,
    settings: RenderSettings,
    *,
    frames_dir: Path | None = None,
    limits: Limits | None = None,
    progress: bool = True,
) -> Timings:
    """Render a whole clip to ``out_path`` (H.264 + AAC), the CLI's path; returns the timings."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".mp4":
        raise InputError(f"--out {out_path}: the output must be an .mp4 file")
    if not out_path.parent.is_dir():
        raise InputError(f"--out {out_path}: directory {out_path.parent} does not exist")
    configured_identity()  # a half-configured signing identity fails before the render, not after
    wall = time.perf_counter()
    load_start = time.perf_counter()
    template = open_template(Path(template_path), settings, limits)
    models = load_render_models(settings, version=template.version)
    load_seconds = time.perf_counter() - load_start

    feature_start = time.perf_counter()
    features = compute_features(models, Path(audio_path), limits)
    feature_seconds = time.perf_counter() - feature_start
    timings = render_clip(
        models,
        template,
        features,
        Path(audio_path),
        out_path,
        settings,
        frames_dir=frames_dir,
        progress=progress,
    )
    timings.load = load_seconds
    timings.audio_features = feature_seconds
    timings.total = time.perf_counter() - wall
    return timings


def render_clip(
    models: Models,
    template: Template,
    features: AudioFeatures,
    audio_path: Path,
    out_path: Path,
    settings: RenderSettings,
    *,
    request: str | None = None,
    frames_dir: Path | None = None,
    progress: bool = False,
) -> Timings:
    """Every frame of ``features`` as one chunk, muxed with ``audio_path`` into ``out_path`` (written
    atomically) and signed with the deployment's content credentials, if any (``request`` names the
    reply in them); the timings of the chunk, the mux and the signature (the worker's path and the CLI's)."""
    fps = fps_fraction(settings.fps or template.fps)
    total_frames = features.num_frames(fps)
    if total_frames == 0:
        raise InputError(f"{audio_path}: the audio is shorter than one video frame at {float(fps):g} fps")
    bar = _progress_bar(total_frames, progress)

    def retry(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)
        if bar is not None:
            bar.reset()

    with tempfile.TemporaryDirectory(prefix=".musetalk-", dir=out_path.parent) as tmp:
        try:
            chunk = render_chunk(
                models,
                template,
                features,
                0,
                total_frames,
                Path(tmp) / "segment.mp4",
                settings,
                frames_dir=frames_dir,
                on_frames=bar.update if bar else None,
                on_retry=retry,
            )
        finally:
            if bar is not None:
                bar.close()
        timings = chunk.timings
        muxed = Path(tmp) / "out.mp4"  # muxed and signed here, then renamed: out_path is never unsigned
        with timings.stage("mux"):
            mux([chunk.path], audio_path, muxed, comment=GENERATED_COMMENT)
        timed_sign(muxed, template_provenance(template, request), timings)
        os.replace(muxed, out_path)
    return timings


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="render", leave=False, dynamic_ncols=True)

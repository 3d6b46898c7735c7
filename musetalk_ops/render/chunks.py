"""Chunks of a request: ``plan_chunks`` splits its frames over GPUs, ``render_chunk`` renders one range
into an H.264 segment (the chunk API), halving the batch on CUDA out-of-memory."""

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musetalk_ops.audio import AudioFeatures
from musetalk_ops.config import dtype_name
from musetalk_ops.engine.spec import find_engine_for
from musetalk_ops.errors import GpuMemoryError, InputError
from musetalk_ops.generator import GRAPH_MODES
from musetalk_ops.models import Models
from musetalk_ops.render.fast import release_gpu_memory, render_fast
from musetalk_ops.render.job import ChunkJob, Progress
from musetalk_ops.render.reference import render_reference
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import Template
from musetalk_ops.timings import Timings
from musetalk_ops.video import fps_fraction


@dataclass
class ChunkResult:
    path: Path
    frames: int
    timings: Timings = field(repr=False)


def plan_chunks(num_frames: int, gpus: int, min_chunk_frames: int = 250) -> list[tuple[int, int]]:
    """Split ``[0, num_frames)`` into equal contiguous ranges, one per GPU, never shorter than
    ``min_chunk_frames`` (except a short clip, which is one chunk): per-chunk start-up costs seconds."""
    if num_frames <= 0:
        raise InputError("nothing to render: the audio is shorter than one video frame")
    count = max(1, min(gpus, math.ceil(num_frames / max(1, min_chunk_frames))))
    bounds = [i * num_frames // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


def resolve_mode(mode: str | None, models: Models, batch_size: int) -> str:
    """The render mode. Default on CUDA: ``aot`` where ``musetalk engine build`` made an engine for these
    models, this GPU and ``batch_size`` (the fastest path, bench/RESULTS.md), else ``graphs``: a render
    never builds one unasked (minutes). On the CPU, ``reference``."""
    device = models.device
    if mode is None:
        if device.type != "cuda":
            return "reference"
        return "aot" if find_engine_for(models.unet, models.vae, batch_size) is not None else "graphs"
    if mode in GRAPH_MODES and device.type != "cuda":
        raise InputError(
            f"render mode {mode} needs a CUDA GPU (the device is {device}): use eager or reference"
        )
    return mode


def render_chunk(
    models: Models,
    template: Template,
    features: AudioFeatures,
    start: int,
    stop: int,
    out_path: Path,
    settings: RenderSettings,
    *,
    frames_dir: Path | None = None,
    on_frames: Callable[[int], None] | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> ChunkResult:
    """Render output frames ``[start, stop)`` into one independently decodable H.264 segment.

    Every output frame ``i`` shows template frame ``frame_indices(i)`` (the official cycle, latent
    delay 0) driven by the audio window of frame ``i``; frames without a face pass through untouched
    and are never sent to the model.

    On CUDA out-of-memory the chunk starts again at half the batch size (``on_retry`` hears why), so a
    GPU smaller or busier than the one the batch size was chosen for still renders it, a little slower;
    the segment of a failed attempt is never kept (it is written atomically). An engine exists for one
    batch size, so an ``aot`` render retries on the default path (another engine only where one was
    built, never a build). The result's timings name the batch size and mode that succeeded.
    """
    while True:
        try:
            return _render_once(
                models, template, features, start, stop, out_path, settings, frames_dir, on_frames
            )
        except torch.cuda.OutOfMemoryError as e:
            if settings.batch_size == 1:
                raise GpuMemoryError(f"CUDA out of memory even at batch size 1: {_first_line(e)}") from None
            smaller = settings.batch_size // 2
            if on_retry is not None:
                on_retry(f"CUDA out of memory at batch size {settings.batch_size}: retrying with {smaller}")
            mode = None if settings.mode == "aot" else settings.mode
            settings = dataclasses.replace(settings, batch_size=smaller, mode=mode)
        # Out of the handler: the error's traceback, which holds the failed attempt's frames and so its
        # tensors and generator, is gone before the memory is returned.
        release_gpu_memory()


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


@torch.inference_mode()
def _render_once(
    models: Models,
    template: Template,
    features: AudioFeatures,
    start: int,
    stop: int,
    out_path: Path,
    settings: RenderSettings,
    frames_dir: Path | None,
    on_frames: Callable[[int], None] | None,
) -> ChunkResult:
    fps = fps_fraction(settings.fps or template.fps)  # the exact rate the video is encoded at
    total_frames = features.num_frames(fps)
    if not 0 <= start < stop <= total_frames:
        raise InputError(f"frame range [{start}, {stop}) is outside the clip's {total_frames} frames")
    mode = resolve_mode(settings.mode, models, settings.batch_size)
    timings = Timings(
        device=str(models.device),
        dtype=dtype_name(models.dtype),
        batch_size=settings.batch_size,
        weights=models.weights,
        mode=mode,
        frames=stop - start,
        video_seconds=float((stop - start) / fps),
    )
    wall = time.perf_counter()
    job = ChunkJob(template, features, fps, start, stop, frames_dir, Progress(on_frames))
    if frames_dir is not None:
        frames_dir.mkdir(parents=True, exist_ok=True)
    if mode == "reference":
        render_reference(models, job, Path(out_path), settings, timings)
    else:
        render_fast(models, job, Path(out_path), settings, mode, timings)
    timings.total = time.perf_counter() - wall
    return ChunkResult(path=Path(out_path), frames=stop - start, timings=timings)

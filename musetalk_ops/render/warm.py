"""Warm-up of a long-lived render process: every batch bucket of its render path runs once before the
first reply, so no reply pays for kernel selection, graph capture or allocator growth."""

import tempfile
import time
from pathlib import Path

import numpy as np

from musetalk_ops.audio import SAMPLE_RATE, extract_features
from musetalk_ops.models import Models
from musetalk_ops.render.chunks import render_chunk, resolve_mode
from musetalk_ops.render.fast import cached_generator
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import Template
from musetalk_ops.video import fps_fraction

# Quiet noise, not silence: it runs Whisper over real-looking input (the seed keeps warm-ups alike).
_NOISE_LEVEL = 1e-3


def warm_plan(models: Models, settings: RenderSettings) -> tuple[tuple[int, ...], int]:
    """The batch sizes a render of ``settings`` pads its batches to, smallest first, and how many times
    to run each (twice where the generator captures CUDA graphs: at a bucket's second batch). The
    reference path has no buckets (it runs batches as they are): one frame pays its first-call costs."""
    mode = resolve_mode(settings.mode, models, settings.batch_size)
    if mode == "reference":
        return (1,), 1
    generator = cached_generator(models.unet, models.vae, mode, settings.batch_size)  # the one renders use
    return tuple(sorted(generator.buckets)), 2 if generator.capture else 1


def warm_up(models: Models, settings: RenderSettings, template: Template | None) -> float:
    """Run Whisper once and, with ``template``, render every bucket (``warm_plan``); returns the seconds
    it took. Without a template only Whisper is warmed."""
    start = time.perf_counter()
    buckets, runs = warm_plan(models, settings) if template is not None else ((1,), 0)
    fps = fps_fraction(settings.fps or (template.fps if template is not None else 25))
    seconds = max(1.0, (max(buckets) + 1) / float(fps))
    noise = np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    features = extract_features(models.whisper, noise * _NOISE_LEVEL)
    with tempfile.TemporaryDirectory(prefix="musetalk-warm-") as tmp:
        for size in buckets:  # smallest first: a batch of ``size`` frames then lands in its own bucket
            for run in range(runs):
                render_chunk(models, template, features, 0, size, Path(tmp) / f"{size}-{run}.mp4", settings)
    return time.perf_counter() - start

"""The fast path: bucketed batches on the device, device-side paste-back, parallel sub-segment encoders."""

import gc
import itertools
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from musetalk_ops.audio import add_positional_encoding
from musetalk_ops.device_paste import DevicePaster, to_device
from musetalk_ops.generator import FaceGenerator, StageClock
from musetalk_ops.models import Models
from musetalk_ops.render.encoders import Aborted, SubSegmentEncoder, encoder_count
from musetalk_ops.render.job import ChunkJob, batches
from musetalk_ops.render.patches import host_patches
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.timings import Timings
from musetalk_ops.video import GENERATED_COMMENT, mux


@lru_cache(maxsize=4)
def cached_generator(unet, vae, mode: str, max_batch: int) -> FaceGenerator:
    """One generator per models/mode/batch size and process: captured graphs and compiled code are
    reused by every later chunk of a warm process."""
    return FaceGenerator(unet, vae, mode=mode, max_batch=max_batch)


def release_gpu_memory() -> None:
    """Drop every captured generator and return cached CUDA memory, e.g. after an out-of-memory
    error, so a retry at a smaller batch size does not compete with the failed size's graphs."""
    cached_generator.cache_clear()
    gc.collect()  # what only a cycle still references (an engine's runners, captured graphs)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def render_fast(
    models: Models, job: ChunkJob, out_path: Path, settings: RenderSettings, mode: str, timings: Timings
) -> None:
    """Bucketed batches on the device, device-side paste-back, parallel sub-segment encoders."""
    device, dtype = models.device, models.dtype
    generator = cached_generator(models.unet, models.vae, mode, settings.batch_size)
    built = generator.build_seconds
    paster = DevicePaster(job.template, device)
    paster.load(job.indices[job.has_face])  # before the GPU is busy: the upload waits for it
    # Model inputs live on the device for the whole chunk (a few KB per frame) and are gathered there
    # per batch: no per-batch tensor work on the host, whose thread pool would spin on the cores that
    # x264 needs.
    latents = job.template.latents.to(device=device, dtype=dtype)
    tokens = add_positional_encoding(job.windows.to(device=device, dtype=dtype))
    clock = StageClock(device)
    count = encoder_count(settings, mode, job.stop - job.start, float(job.fps))
    bounds = [i * (job.stop - job.start) // count for i in range(count + 1)]
    with clock("composite"):
        backgrounds = {int(k): paster.background(int(k)) for k in np.unique(job.indices)}
    with tempfile.TemporaryDirectory(prefix=".musetalk-", dir=out_path.parent) as tmp:
        parts = [out_path] if count == 1 else [Path(tmp) / f"part{n:03d}.mp4" for n in range(count)]
        abort = threading.Event()
        encoders = [
            SubSegmentEncoder(job, lo, hi, path, settings, backgrounds, abort)
            for (lo, hi), path in zip(itertools.pairwise(bounds), parts, strict=True)
        ]
        for encoder in encoders:
            encoder.start()
        try:
            block = max(1, settings.batch_size // count)
            order = _interleave(
                [np.flatnonzero(job.has_face[lo:hi]) + lo for lo, hi in itertools.pairwise(bounds)], block
            )
            for batch in batches(len(order), settings.batch_size):
                rows = order[batch]
                ks = job.indices[rows]
                index = to_device(torch.from_numpy(np.stack([rows, ks])), device)
                faces = generator(latents[index[1]], tokens[index[0]], clock)
                with clock("composite"):
                    patches = host_patches(paster.composite(faces, ks), job.frames_dir is not None)
                items = [(int(row), patch) for row, patch in zip(rows, patches, strict=True)]
                for item in sorted(items, key=lambda item: item[0]):  # each encoder takes its frames in order
                    encoders[np.searchsorted(bounds, item[0], side="right") - 1].put(item)
        except Aborted:
            pass  # an encoder failed and stopped the others: its own error is raised below
        except BaseException:
            abort.set()
            raise
        finally:
            for encoder in encoders:
                encoder.join()
        errors = [e.error for e in encoders if e.error is not None and not isinstance(e.error, Aborted)]
        if errors:
            raise errors[0]
        for name, seconds in clock.totals().items():
            timings.add(name, seconds)
        for encoder in encoders:
            timings.add("composite", encoder.composite_seconds)
            timings.add("encode", encoder.encode_seconds)
        if count > 1:
            with timings.stage("encode"):
                mux(parts, None, out_path, comment=GENERATED_COMMENT)
    timings.extra["build"] = generator.build_seconds - built
    timings.extra["encoders"] = float(count)
    timings.extra["waited_for_encoders"] = sum(e.waited_seconds for e in encoders)


def _interleave(groups: list[np.ndarray], block: int) -> np.ndarray:
    """Round-robin ``block`` items at a time from each group, each group in order: the model works on
    every sub-segment at once, so all encoders are fed from the first batch on."""
    pieces = [
        g[i : i + block] for i in range(0, max((len(g) for g in groups), default=0), block) for g in groups
    ]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

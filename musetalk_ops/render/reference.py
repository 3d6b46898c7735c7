"""The reference path: faces to the host, ``blend.paste_face`` and encoding on one worker thread."""

import queue
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from musetalk_ops.audio import add_positional_encoding
from musetalk_ops.blend import paste_face
from musetalk_ops.models import Models
from musetalk_ops.models.unet import unet_predict
from musetalk_ops.models.vae import decode_latents, decode_sliced
from musetalk_ops.render.job import ChunkJob, batches
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.timings import Timings
from musetalk_ops.video import SegmentWriter


class _Compositor(threading.Thread):
    """Pastes generated faces into their frames and feeds the encoder, off the model's thread."""

    def __init__(self, job: ChunkJob, writer: SegmentWriter, timings: Timings) -> None:
        super().__init__(name="musetalk-compositor", daemon=True)
        self.job, self.writer, self.timings = job, writer, timings
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self._composite_and_encode(*job)
                except BaseException as exc:  # re-raised on the model thread by finish()
                    self.error = exc

    def _composite_and_encode(self, batch: slice, faces: dict[int, np.ndarray]) -> None:
        t = self.job.template
        for j, k in enumerate(self.job.indices[batch]):
            start = time.perf_counter()
            face = t.faces[k]
            if face is None:
                frame = t.frames[k]
            else:
                frame = paste_face(t.frames[k], faces[j], face.face_box, t.masks[k], face.crop_box)
            encode_start = time.perf_counter()
            self.writer.write(frame)
            self.timings.add("composite", encode_start - start)
            self.timings.add("encode", time.perf_counter() - encode_start)
            self.job.save_png(batch.start + j, frame)
        self.job.progress(batch.stop - batch.start)

    def submit(self, batch: slice, faces: dict[int, np.ndarray]) -> None:
        self._raise_if_failed()
        self.jobs.put((batch, faces))

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def render_reference(
    models: Models, job: ChunkJob, out_path: Path, settings: RenderSettings, timings: Timings
) -> None:
    """Faces to the host, ``paste_face`` and encoding on one worker thread (the exact reference)."""
    device = models.device
    latents = job.template.latents.to(device=device, dtype=models.dtype)
    width, height = job.size
    with SegmentWriter(out_path, job.fps, width, height, crf=settings.crf, preset=settings.preset) as writer:
        compositor = _Compositor(job, writer, timings)
        compositor.start()
        try:
            for batch in batches(job.stop - job.start, settings.batch_size):
                rows = np.flatnonzero(job.has_face[batch])
                faces: dict[int, np.ndarray] = {}
                if rows.size:
                    src = torch.from_numpy(job.indices[batch][rows]).to(device)
                    tokens = add_positional_encoding(
                        job.windows[batch][torch.from_numpy(rows)].to(device=device, dtype=models.dtype)
                    )
                    with timings.stage("unet", device):
                        pred = unet_predict(models.unet, latents[src], tokens)
                    with timings.stage("vae_decode", device):
                        decoded = decode_sliced(partial(decode_latents, models.vae), pred).cpu().numpy()
                    faces = dict(zip(rows.tolist(), decoded, strict=True))
                compositor.submit(batch, faces)
        finally:
            compositor.finish()

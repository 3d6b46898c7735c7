"""The fast path's sub-segment encoders: threads that assemble YUV frames from patches and run x264."""

import math
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from musetalk_ops.render.job import ChunkJob
from musetalk_ops.render.patches import Patch
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.video import SegmentWriter
from musetalk_ops.yuv import i420_planes

SUBSEGMENT_SECONDS = 4  # shortest sub-segment worth its own encoder (two 2 s GOPs)
CPUS_PER_ENCODER = 4  # host CPUs per sub-segment encoder (how many encoders a chunk gets)
X264_THREADS = 0  # x264 frame threads of each sub-segment encoder; 0: x264's own choice (1.5 per CPU)


def encoder_count(settings: RenderSettings, mode: str, frames: int, fps: float) -> int:
    """Parallel sub-segment encoders for a chunk of ``frames`` (see ``RenderSettings``)."""
    if mode == "reference":
        return 1
    if settings.encoders is not None:
        return min(settings.encoders, frames)
    longest = max(1, frames // math.ceil(SUBSEGMENT_SECONDS * fps))
    return max(1, min(len(os.sched_getaffinity(0)) // CPUS_PER_ENCODER, longest))


class Aborted(Exception):
    """Another thread failed; this one stops without adding an error of its own."""


class SubSegmentEncoder(threading.Thread):
    """Writes output frames [lo, hi) of a chunk as one segment; patches arrive in frame order.

    Frames are assembled in YUV 4:2:0 from the template frame's converted ``backgrounds`` and the
    patch's block, so x264 gets them without a conversion on this thread. The frame buffer is reused:
    when consecutive frames come from the same template frame only the block is rewritten (x264 has
    copied the previous frame before ``write_yuv`` returns).
    """

    def __init__(
        self,
        job: ChunkJob,
        lo: int,
        hi: int,
        path: Path,
        settings: RenderSettings,
        backgrounds: dict[int, np.ndarray],
        abort: threading.Event,
    ) -> None:
        super().__init__(name=f"musetalk-encoder-{lo}", daemon=True)
        self.job, self.lo, self.hi, self.path, self.settings, self.abort = job, lo, hi, path, settings, abort
        self.backgrounds = backgrounds
        self.items: queue.Queue = queue.Queue(maxsize=2 * settings.batch_size)
        self.composite_seconds = self.encode_seconds = self.waited_seconds = 0.0
        self.error: BaseException | None = None

    def put(self, item: tuple[int, Patch]) -> None:
        """Queue a patch; the model thread's time blocked here (the encoder is behind) is counted."""
        start = time.perf_counter()
        try:
            while True:
                try:
                    self.items.put(item, timeout=0.1)
                    return
                except queue.Full:
                    if self.abort.is_set():
                        raise Aborted from None
        finally:
            self.waited_seconds += time.perf_counter() - start

    def _next(self) -> tuple[int, Patch]:
        while True:
            try:
                return self.items.get(timeout=0.1)
            except queue.Empty:
                if self.abort.is_set():
                    raise Aborted from None

    def run(self) -> None:
        try:
            self._encode()
        except BaseException as exc:  # reported by the model thread after join
            self.error = exc
            self.abort.set()

    def _encode(self) -> None:
        job, frames = self.job, self.job.template.frames
        width, height = job.size
        buffer, current = np.empty_like(next(iter(self.backgrounds.values()))), -1
        luma, u_plane, v_plane = i420_planes(buffer)
        rgb = np.empty_like(frames[0]) if job.frames_dir is not None else None
        with SegmentWriter(
            self.path, job.fps, width, height, self.settings.crf, self.settings.preset, X264_THREADS
        ) as writer:
            for i in range(self.lo, self.hi):
                k = int(job.indices[i])
                if job.has_face[i]:
                    row, patch = self._next()
                    if row != i:
                        raise RuntimeError(
                            f"encoder for frames [{self.lo}, {self.hi}) got frame {row} for {i}"
                        )
                    if patch.ready is not None:
                        patch.ready.synchronize()
                    start = time.perf_counter()  # waiting for the GPU is not compositing
                    if k != current:
                        np.copyto(buffer, self.backgrounds[k])
                        if rgb is not None:
                            np.copyto(rgb, frames[k])
                        current = k
                    if patch.planes is not None:
                        x1, y1, x2, y2 = patch.block
                        luma[y1:y2, x1:x2] = patch.planes[0]
                        u_plane[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2] = patch.planes[1]
                        v_plane[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2] = patch.planes[2]
                    if rgb is not None and patch.rgb is not None:
                        x1, y1, x2, y2 = patch.region
                        rgb[y1:y2, x1:x2] = patch.rgb
                    frame, picture = buffer, rgb
                else:
                    start, frame, picture = time.perf_counter(), self.backgrounds[k], frames[k]
                encode_start = time.perf_counter()
                writer.write_yuv(frame)
                self.composite_seconds += encode_start - start
                self.encode_seconds += time.perf_counter() - encode_start
                if picture is not None:
                    job.save_png(i, picture)
                job.progress(1)

"""What one chunk renders (``ChunkJob``): its output frames, where each comes from, and their progress."""

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from musetalk_ops.audio import AudioFeatures
from musetalk_ops.blend import frame_indices
from musetalk_ops.template_cache import Template


class Progress:
    """Calls ``on_frames`` (e.g. a progress bar) from any thread, one call at a time."""

    def __init__(self, on_frames: Callable[[int], None] | None) -> None:
        self.on_frames, self._lock = on_frames, threading.Lock()

    def __call__(self, n: int) -> None:
        if self.on_frames is not None:
            with self._lock:
                self.on_frames(n)


@dataclass
class ChunkJob:
    """Output frames [start, stop) of a chunk and where each one comes from."""

    template: Template
    features: AudioFeatures
    fps: Fraction
    start: int
    stop: int
    frames_dir: Path | None
    progress: Progress

    def __post_init__(self) -> None:
        t = self.template
        self.indices = frame_indices(self.start, self.stop, len(t.frames), t.cycle)
        self.has_face = np.array([t.faces[k] is not None for k in self.indices], dtype=bool)
        self.windows = self.features.windows(self.fps, self.start, self.stop)

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.template.frames.shape[1:3]
        return width, height

    def save_png(self, offset: int, frame: np.ndarray) -> None:
        if self.frames_dir is not None:
            import cv2  # 0.3 s to import: only when frames are saved

            cv2.imwrite(str(self.frames_dir / f"{self.start + offset:08d}.png"), frame[:, :, ::-1])


def batches(n: int, size: int) -> Iterator[slice]:
    """``[0, n)`` in consecutive slices of ``size`` (the last one shorter)."""
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))

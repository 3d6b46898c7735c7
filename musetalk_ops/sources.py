"""Template sources: a still image or a short video, decoded to upright RGB frames at a constant rate.

Everything downstream (landmarks, crops, the renderer's frame schedule) assumes frames that look the
way a viewer sees them and arrive at a fixed rate, so orientation metadata (EXIF, display matrices)
is applied here and variable-frame-rate phone videos are resampled here, once.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image, ImageOps

from musetalk_ops.config import Limits
from musetalk_ops.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")
DEFAULT_FPS = 25.0

# Timestamps are quantised to the stream's time base, so "at or before" allows this fraction of an
# output frame of slack; a requested rate this close to the stream's (29.97 for 30000/1001) is taken
# to mean the stream's own, which would otherwise drift by a frame every few thousand frames.
_SLACK_FRAMES = 1e-3
_SAME_RATE = 1e-4


@dataclass
class Source:
    """Decoded template source: ``frames`` uint8 [N, H, W, 3] RGB, upright, at ``fps``."""

    frames: np.ndarray
    fps: float
    kind: Literal["image", "video"]
    path: Path


def read_source(path: str | Path, limits: Limits | None = None, fps: float | None = None) -> Source:
    """Decode an image (one frame at ``fps``, default 25) or a video (resampled to ``fps``, default its
    average rate); raise InputError for anything a user could have got wrong."""
    path = Path(path)
    limits = limits or Limits.from_env()
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(no extension)'}: use an image "
            f"({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})"
        )
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes)")
    if size > limits.max_upload_bytes:
        raise InputError(f"{path} is {size} bytes, more than the limit of {limits.max_upload_bytes}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise InputError(f"fps {fps!r} for {path}: must be a positive number")
    if suffix in IMAGE_SUFFIXES:
        return Source(_read_image(path, limits)[None], float(fps or DEFAULT_FPS), "image", path)
    frames, rate = _read_video(path, limits, fps)
    return Source(frames, rate, "video", path)


def _check_size(path: Path, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_template_pixels:
        raise InputError(
            f"{path} is {width}×{height}: more than the limit of {limits.max_template_pixels} pixels"
        )
    if min(width, height) < limits.min_face_pixels:
        raise InputError(
            f"{path} is {width}×{height}: too small to hold a face "
            f"(at least {limits.min_face_pixels} px on each side)"
        )


def _read_image(path: Path, limits: Limits) -> np.ndarray:
    try:
        with Image.open(path) as im:
            # MPO is a still JPEG with extra embedded pictures (camera previews), not an animation.
            if getattr(im, "is_animated", False) and im.format != "MPO":
                raise InputError(f"{path} is animated: use a video (mp4, mov, webm, mkv) for a moving face")
            _check_size(path, *im.size, limits)
            return _to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path} is not a readable image: {e}") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """RGB like ``cv2.imread`` (which the official code uses): alpha dropped, not composited;
    16-bit samples keep their high byte."""
    if im.mode.startswith("I"):
        high = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(high[..., None], 3, axis=2))
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # palette transparency → alpha, which the next step drops
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _quarter_turns(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int:
    """Counter-clockwise quarter turns that make the frame upright: the display matrix when there is
    one, else the legacy ``rotate`` tag (clockwise degrees)."""
    degrees = frame.rotation
    if not degrees:
        tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), "0")
        try:
            degrees = -float(tag)
        except ValueError:
            degrees = 0
    return round(degrees / 90) % 4


def _read_video(path: Path, limits: Limits, fps: float | None) -> tuple[np.ndarray, float]:
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise InputError(f"{path} is not a readable video: {e}") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        stream = container.streams.video[0]
        _check_size(path, stream.codec_context.width, stream.codec_context.height, limits)
        if container.duration and container.duration / av.time_base > limits.max_template_seconds + 1:
            raise InputError(_too_long(path, limits))
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        frames: list[np.ndarray] = []
        times: list[float | None] = []
        last_duration = None
        turns = 0
        try:
            for frame in container.decode(stream):
                if not frames:
                    turns = _quarter_turns(frame, stream)
                times.append(frame.time)
                elapsed = None if None in (frame.time, times[0]) else frame.time - times[0]
                if elapsed is not None and elapsed > limits.max_template_seconds:
                    raise InputError(_too_long(path, limits))  # before memory runs out
                last_duration = float(frame.duration * frame.time_base) if frame.duration else None
                rgb = frame.to_ndarray(format="rgb24", src_color_range=frame.color_range)
                frames.append(np.rot90(rgb, turns))
        except av.FFmpegError as e:
            raise InputError(f"{path}: video decoding failed: {e}") from None
    if not frames:
        raise InputError(f"{path} has no decodable video frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise InputError(f"{path} changes its frame size mid-stream")
    src_rate = float(rate) if rate else DEFAULT_FPS
    if any(t is None for t in times):
        seconds = np.arange(len(frames)) / src_rate  # no timestamps: the declared rate is all we have
    else:
        seconds = np.asarray(times, dtype=np.float64) - times[0]
    out_fps = float(fps) if fps else src_rate
    indices = resample_indices(seconds, last_duration or 1 / src_rate, out_fps, src_rate)
    duration = len(indices) / out_fps
    if duration > limits.max_template_seconds:
        raise InputError(_too_long(path, limits))
    return np.stack([frames[i] for i in indices]), out_fps


def resample_indices(seconds: np.ndarray, last_duration: float, fps: float, source_fps: float) -> np.ndarray:
    """For each output time k/fps within the clip, the last source frame shown at or before it.

    ``seconds`` are presentation times relative to the first frame; the clip lasts until the last
    frame's end (its time plus ``last_duration``)."""
    if abs(fps / source_fps - 1) < _SAME_RATE:
        fps = source_fps
    order = np.argsort(seconds, kind="stable")
    seconds = seconds[order]
    count = max(1, math.floor((seconds[-1] + last_duration) * fps + _SLACK_FRAMES))
    out_times = np.arange(count) / fps + _SLACK_FRAMES / fps
    picks = np.searchsorted(seconds, out_times, side="right") - 1
    return order[np.clip(picks, 0, None)]


def _too_long(path: Path, limits: Limits) -> str:
    return (
        f"{path} lasts longer than the limit of {limits.max_template_seconds:g} s "
        "(MUSETALK_MAX_TEMPLATE_SECONDS)"
    )

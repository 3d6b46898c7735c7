"""Face landmarks and the official MuseTalk face box (docs/reference.md §2.3–2.5).

The official code finds 68 face landmarks with DWPose; we use dlib's 68-point shape predictor
(shipped by ``face-recognition-models``), whose point indices are the same iBUG-68 layout, and
then apply the official box rule unchanged. The detector is pluggable (``LandmarkDetector``):
dlib's model was trained on iBUG 300-W, whose licence excludes commercial use.
"""

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from musetalk_ops.blend import Box
from musetalk_ops.config import Limits
from musetalk_ops.errors import InputError, ModelFilesError
from musetalk_ops.settings import TemplateSettings

NOSE_POINT = 29  # 0-based; the box is centred vertically on this nose-bridge point


class LandmarkDetector(Protocol):
    """Anything that returns the 68 iBUG-layout landmarks ``[68, 2]`` (x, y) of each face in an RGB frame."""

    def detect(self, frame: np.ndarray) -> list[np.ndarray]: ...


def _dlib_model_file(name: str) -> Path:
    # The package's __init__ imports pkg_resources (gone from recent setuptools): locate, never import.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError("face-recognition-models is not installed (pip install it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise ModelFilesError(f"missing landmark model {path} (reinstall face-recognition-models)")
    return path


class DlibDetector:
    """dlib HOG frontal-face detector + 68-point shape predictor.

    ``upsample`` stays 0: upsampling once finds a false face on the astronaut's mission patch and
    costs 4× the time; faces smaller than ~80 px are below the useful template size anyway.
    Frames whose long side exceeds ``max_side`` are searched at that size first (4× faster at 1080p)
    and at full size only when nothing is found; landmarks are always predicted at full size.
    Detections scoring below ``relative_score`` × the best one are dropped: on a 1080p frame the
    mission patch scores ≈0.1 next to the real face's ≈1.3.
    """

    def __init__(self, upsample: int = 0, max_side: int = 960, relative_score: float = 0.5) -> None:
        import dlib

        self._dlib = dlib
        self.upsample = upsample
        self.max_side = max_side
        self.relative_score = relative_score
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(_dlib_model_file("shape_predictor_68_face_landmarks.dat")))

    def detect(self, frame: np.ndarray) -> list[np.ndarray]:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        faces = []
        for rect in self._find(frame):
            shape = self._predictor(frame, rect)
            faces.append(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.int32))
        return faces

    def _find(self, frame: np.ndarray) -> list:
        height, width = frame.shape[:2]
        scale = self.max_side / max(height, width)
        if scale < 1:
            size = (round(width * scale), round(height * scale))
            rects = self._run(cv2.resize(frame, size, interpolation=cv2.INTER_AREA), 1 / scale)
            if rects:
                return rects
        return self._run(frame, 1.0)

    def _run(self, image: np.ndarray, factor: float) -> list:
        rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        if not rects:
            return []
        floor = max(scores) * self.relative_score
        return [
            self._dlib.rectangle(*(round(v * factor) for v in (r.left(), r.top(), r.right(), r.bottom())))
            for r, score in zip(rects, scores, strict=True)
            if score >= floor
        ]


def landmark_box(lm: np.ndarray, shift: int = 0, fallback: Box | None = None) -> Box | None:
    """The official landmark box (docs/reference.md §2.4): x from the extreme points, y2 at the lowest point,
    y1 mirrored about the (shifted) nose point 29 and clamped at 0.

    Landmarks are truncated to int32 like the official ``astype(np.int32)``. The official code shifts
    point 29 in place before taking the maximum y, so the shifted point takes part in it; we do the
    same on a copy. An invalid box (empty, or x1 < 0) gives ``fallback`` (official: the detector box).
    """
    pts = np.asarray(lm).astype(np.int32)
    pts[NOSE_POINT, 1] += shift
    centre_y = int(pts[NOSE_POINT, 1])
    y2 = int(pts[:, 1].max())
    y1 = int(max(0, centre_y - (y2 - centre_y)))
    x1, x2 = int(pts[:, 0].min()), int(pts[:, 0].max())
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        return fallback
    return (x1, y1, x2, y2)


def apply_extra_margin(box: Box, margin: int, height: int) -> Box:
    """v1.5's extra chin margin: ``y2 = min(y2 + margin, height)`` (docs/reference.md §2.5)."""
    x1, y1, x2, y2 = box
    return (x1, y1, x2, min(y2 + margin, height))


def clip_box(box: Box, width: int, height: int) -> Box:
    """Right and bottom edges clipped to the frame. Official code leaves them (numpy slicing then crops
    less than the box while paste-back stretches to the full box); clipping keeps crop and paste equal."""
    x1, y1, x2, y2 = box
    return (x1, y1, min(x2, width), min(y2, height))


def _extent_box(lm: np.ndarray, width: int, height: int) -> Box | None:
    """Stand-in for the official S3FD fallback box: the landmarks' extent clipped to the frame."""
    pts = np.asarray(lm).astype(np.int32)
    x1, y1 = max(0, int(pts[:, 0].min())), max(0, int(pts[:, 1].min()))
    x2, y2 = min(width, int(pts[:, 0].max())), min(height, int(pts[:, 1].max()))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def largest_face(faces: Sequence[np.ndarray]) -> int:
    """Index of the face whose landmarks span the largest area (the template's subject)."""
    spans = [np.ptp(f[:, 0]) * np.ptp(f[:, 1]) for f in faces]
    return int(np.argmax(spans))


def format_indices(indices: Sequence[int], limit: int = 12) -> str:
    """``0-4, 7, 9`` style list of frame indices, shortened after ``limit`` runs."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit]]
    if len(runs) > limit:
        text.append(f"… ({len(indices)} frames)")
    return ", ".join(text)


@dataclass
class FaceTrack:
    """Per-frame result: ``boxes`` are face boxes after extra_margin (None = no face: the frame passes
    through untouched); ``landmarks`` are None for a manual box; ``warnings`` are for the caller's log."""

    boxes: list[Box | None]
    landmarks: list[np.ndarray | None]
    warnings: list[str]


def track_faces(
    frames: np.ndarray,
    settings: TemplateSettings,
    *,
    detector: LandmarkDetector | None = None,
    limits: Limits | None = None,
    name: str = "template",
) -> FaceTrack:
    """Face box for every frame: the manual ``settings.face_box`` or one detection per frame.

    Boxes get extra_margin (v15) and are clipped to the frame. Frames without a face are an error
    naming them, unless ``settings.no_face == "passthrough"``; a template where no frame has a face
    is always an error. ``name`` prefixes error messages.
    """
    limits = limits or Limits.from_env()
    n, height, width = frames.shape[:3]
    if settings.face_box is not None:
        if settings.face_box[2] > width or settings.face_box[3] > height:
            raise InputError(
                f"{name}: face_box {list(settings.face_box)} lies outside the {width}x{height} frame"
            )
        raw: list[Box | None] = [settings.face_box] * n
        landmarks: list[np.ndarray | None] = [None] * n
        warnings: list[str] = []
    else:
        raw, landmarks, warnings = _detect(frames, detector or DlibDetector(), settings.shift)
    missing = [i for i, box in enumerate(raw) if box is None]
    if len(missing) == n:
        raise InputError(f"{name}: no face found" + (f" in any of the {n} frames" if n > 1 else ""))
    if missing and settings.no_face == "error":
        raise InputError(
            f"{name}: no face found in frame(s) {format_indices(missing)} of {n} "
            "(set no_face: passthrough to keep those frames unchanged)"
        )
    if missing:
        warnings.append(f"no face in frame(s) {format_indices(missing)}: passed through unchanged")
    small = [
        i
        for i, box in enumerate(raw)
        if box is not None and min(box[2] - box[0], box[3] - box[1]) < limits.min_face_pixels
    ]
    if small:
        raise InputError(
            f"{name}: face smaller than {limits.min_face_pixels} px in frame(s) "
            f"{format_indices(small)} (use a closer shot or a larger image)"
        )
    boxes = [
        None if box is None else clip_box(apply_extra_margin(box, settings.margin, height), width, height)
        for box in raw
    ]
    return FaceTrack(boxes=boxes, landmarks=landmarks, warnings=warnings)


def _detect(
    frames: np.ndarray, detector: LandmarkDetector, shift: int
) -> tuple[list[Box | None], list[np.ndarray | None], list[str]]:
    height, width = frames.shape[1:3]
    boxes: list[Box | None] = []
    landmarks: list[np.ndarray | None] = []
    crowded: list[int] = []
    for i, frame in enumerate(frames):
        found = detector.detect(frame)
        if not found:
            boxes.append(None)
            landmarks.append(None)
            continue
        if len(found) > 1:
            crowded.append(i)
        lm = found[largest_face(found)]
        box = landmark_box(lm, shift, fallback=_extent_box(lm, width, height))
        boxes.append(box)
        landmarks.append(lm if box is not None else None)
    warnings = []
    if crowded:
        warnings.append(f"several faces in frame(s) {format_indices(crowded)}: used the largest")
    return boxes, landmarks, warnings

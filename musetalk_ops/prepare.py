"""Template preparation: source image or video → template cache (docs/template-cache.md), once per template.

Per frame, as the official realtime avatar preparation (docs/reference.md §2.4–2.10, §3.1) does it: face box
from 68 landmarks (or the manual box) → extra_margin → crop → 256² LANCZOS4 → VAE latents (posterior
mean) → square crop box → BiSeNet parsing of the crop box → parsing mode → blending mask. Model work
runs in batches; a video gets one detection per frame and is played ping-pong by the renderer.
"""

import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from musetalk_ops.blend import Box, crop_box_for
from musetalk_ops.config import Limits, models_dir, resolve_device, resolve_dtype
from musetalk_ops.config import cache_dir as default_cache_dir
from musetalk_ops.errors import InputError
from musetalk_ops.faces import FaceTrack, LandmarkDetector, track_faces
from musetalk_ops.files import sha256_file
from musetalk_ops.ids import validate_id
from musetalk_ops.keys import MANIFEST
from musetalk_ops.masks import blending_mask, landmark_mask, parse_mask
from musetalk_ops.models.bisenet import BiSeNet, load_bisenet, parse_faces
from musetalk_ops.models.layout import ModelLayout, check_models, weights_fingerprint
from musetalk_ops.models.vae import CROP, encode_crops, load_vae
from musetalk_ops.models.vae_model import VAE
from musetalk_ops.settings import TemplateSettings
from musetalk_ops.sources import IMAGE_SUFFIXES, read_source
from musetalk_ops.template_cache import Face, template_fingerprint, write_cache
from musetalk_ops.timings import Timings

log = logging.getLogger(__name__)

BATCH = 8  # frames per step of the stages (the models see one frame per call: vae.encode_crops)
STAGES = ("decode", "detect", "load", "crop", "vae", "parse", "masks", "write")


def _components(settings: TemplateSettings) -> tuple[str, ...]:
    return ("vae", "bisenet") if settings.mask_source == "parsing" else ("vae",)


def weights_id(models_root: Path, settings: TemplateSettings) -> str:
    """What the manifest's ``model.weights`` records: "demo", or the fingerprint of the files the cache
    depends on (VAE, plus BiSeNet when masks come from parsing)."""
    layout = ModelLayout(models_root)
    if settings.mask_source == "parsing":
        files = layout.template_files()
    else:
        files = (layout.vae_config, layout.vae_weights)
    return weights_fingerprint(models_root, files)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST).is_file():
        raise InputError(f"{out_dir} is not empty and is not a template cache: choose another directory")
    if not force:
        raise InputError(f"template cache {out_dir} already exists (use --force to rebuild it)")


def face_crops(frames: Sequence[np.ndarray], boxes: Sequence[Box]) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` resized to 256² with LANCZOS4 (aspect not kept; docs/reference.md §2.6)."""
    crops = [
        cv2.resize(frame[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_LANCZOS4)
        for frame, (x1, y1, x2, y2) in zip(frames, boxes, strict=True)
    ]
    return np.stack(crops) if crops else np.zeros((0, CROP, CROP, 3), np.uint8)


def region(frame: np.ndarray, box: Box) -> np.ndarray:
    """``frame`` cut to ``box``, zero-filled where the box leaves the frame (as PIL's ``crop`` does)."""
    x1, y1, x2, y2 = box
    height, width = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return out


def draw_preview(frame: np.ndarray, face: Face, mask: np.ndarray) -> np.ndarray:
    """The frame with its face box (green), crop box (blue) and the mask's half-level outline (red)."""
    out = frame.copy()
    cv2.rectangle(out, face.crop_box[:2], (face.crop_box[2] - 1, face.crop_box[3] - 1), (60, 120, 255), 1)
    cv2.rectangle(out, face.face_box[:2], (face.face_box[2] - 1, face.face_box[3] - 1), (0, 220, 0), 2)
    contours, _ = cv2.findContours(
        (mask >= 128).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=face.crop_box[:2]
    )
    cv2.drawContours(out, contours, -1, (255, 40, 40), 2)
    return out


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def prepare_template(
    source: str | Path,
    out_dir: str | Path,
    *,
    template_id: str,
    settings: TemplateSettings | None = None,
    models_root: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    limits: Limits | None = None,
    progress: bool = False,
    detector: LandmarkDetector | None = None,
    timings: Timings | None = None,
) -> Path:
    """Prepare ``source`` into the template cache ``out_dir`` and return it.

    An existing cache is replaced only with ``force``; any other non-empty directory is refused. Missing
    weights raise ModelFilesError before any work. Per-stage seconds (``STAGES``) are added to
    ``timings.extra`` (``load`` to ``timings.load``) and printed with ``progress``.
    """
    source, out_dir = Path(source), Path(out_dir)
    validate_id(template_id, "template id")
    settings = settings or TemplateSettings()
    limits = limits or Limits.from_env()
    timings = timings if timings is not None else Timings()
    root = models_dir(models_root)
    _check_out_dir(out_dir, force)
    if settings.mask_source == "landmarks" and settings.face_box is not None:
        raise InputError(
            "mask_source landmarks needs detected landmarks: remove face_box or use mask_source parsing"
        )
    check_models(root, settings.version, _components(settings))
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    for note in settings.notes():
        log.warning("%s: %s", source.name, note)

    image_fps = settings.fps if source.suffix.lower() in IMAGE_SUFFIXES else None  # videos keep their rate
    with timings.stage("decode"):
        src = read_source(source, limits, fps=image_fps)
    frames = src.frames
    with timings.stage("detect"):
        track = track_faces(frames, settings, detector=detector, limits=limits, name=source.name)
    for warning in track.warnings:
        log.warning("%s: %s", source.name, warning)
    with timings.stage("load", torch_device):
        weights = weights_id(root, settings)
        vae = load_vae(root, torch_device, torch_dtype)
        bisenet = load_bisenet(root, torch_device, torch_dtype) if settings.mask_source == "parsing" else None

    faces, latents, masks = _process(frames, track, settings, vae, bisenet, torch_device, timings, progress)
    with timings.stage("write"):
        first = next(i for i, face in enumerate(faces) if face is not None)
        out = write_cache(
            out_dir,
            template_id=template_id,
            source_path=source,
            settings=settings.to_dict(),
            version=settings.version,
            weights=weights,
            fps=src.fps,
            frame_size=(frames.shape[2], frames.shape[1]),
            faces=faces,
            latents=latents,
            masks=masks,
            cycle="pingpong",
            mask_source=settings.mask_label,
            preview=draw_preview(frames[first], faces[first], masks[first]),
            force=force,
        )
    if progress:
        seconds = ", ".join(
            f"{name} {timings.load if name == 'load' else timings.extra.get(name, 0.0):.2f}"
            for name in STAGES
        )
        print(f"prepared {template_id}: {len(frames)} frame(s); seconds: {seconds}", file=sys.stderr)
    return out


def _process(
    frames: np.ndarray,
    track: FaceTrack,
    settings: TemplateSettings,
    vae: VAE,
    bisenet: BiSeNet | None,
    device: torch.device,
    timings: Timings,
    progress: bool,
) -> tuple[list[Face | None], torch.Tensor, list[np.ndarray | None]]:
    """Latents and blending masks for every frame with a face, ``BATCH`` frames at a time."""
    n = len(frames)
    faces: list[Face | None] = [None] * n
    masks: list[np.ndarray | None] = [None] * n
    latents = torch.zeros((n, 8, CROP // 8, CROP // 8), dtype=torch.float32)  # no-face frames stay zero
    cheeks = (settings.left_cheek_width, settings.right_cheek_width)
    with_face = [i for i, box in enumerate(track.boxes) if box is not None]
    batches = list(_chunks(with_face, BATCH))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="prepare", unit="batch", file=sys.stderr)
    for batch in batches:
        boxes = [track.boxes[i] for i in batch]
        crop_boxes = [crop_box_for(box) for box in boxes]
        with timings.stage("crop"):
            crops = face_crops([frames[i] for i in batch], boxes)
        with timings.stage("vae", device):
            latents[batch] = encode_crops(vae, crops).cpu()
        if bisenet is not None:
            with timings.stage("parse", device):
                regions = [region(frames[i], cb) for i, cb in zip(batch, crop_boxes, strict=True)]
                labels = parse_faces(bisenet, regions)
        with timings.stage("masks"):
            for j, (i, box, crop_box) in enumerate(zip(batch, boxes, crop_boxes, strict=True)):
                if bisenet is not None:
                    seg = parse_mask(labels[j], settings.mode, *cheeks)
                    masks[i] = blending_mask(seg, box, crop_box)
                else:
                    masks[i] = landmark_mask(track.landmarks[i], box, crop_box)
                faces[i] = Face(face_box=box, crop_box=crop_box)
    return faces, latents, masks


def prepare_to_cache(
    source: str | Path,
    cache_root: str | Path | None = None,
    *,
    template_id: str,
    settings: TemplateSettings | None = None,
    models_root: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    limits: Limits | None = None,
    progress: bool = False,
    timings: Timings | None = None,
) -> Path:
    """A cache for ``source`` under ``<cache_root>/templates/<id>/<fingerprint>/`` (default root: the
    engine cache, ``$MUSETALK_CACHE``), prepared now unless an identical one exists. This is what
    ``musetalk render --template <image or video>`` uses: the second render of a file reuses the cache."""
    source = Path(source)
    validate_id(template_id, "template id")
    settings = settings or TemplateSettings()
    root = models_dir(models_root)
    check_models(root, settings.version, _components(settings))
    try:
        source_sha = sha256_file(source)
    except OSError as e:
        raise InputError(f"{source}: cannot read ({e.strerror})") from None
    fingerprint = template_fingerprint(source_sha, settings.to_dict(), weights_id(root, settings))
    out = default_cache_dir(cache_root) / "templates" / template_id / fingerprint
    if (out / MANIFEST).is_file():
        return out
    return prepare_template(
        source,
        out,
        template_id=template_id,
        settings=settings,
        models_root=root,
        device=device,
        dtype=dtype,
        force=True,
        limits=limits,
        progress=progress,
        timings=timings,
    )

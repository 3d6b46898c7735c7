"""Template caches: the self-contained directory format (docs/template-cache.md) and official avatar imports.

A cache is everything the renderer needs about one template (frames via the copied source, boxes,
VAE latents, blending masks), written once by ``prepare`` and read by every render. It is written
atomically (temp sibling, manifest last, rename) and refused on read when partial, stale or damaged,
so a render never runs on half a template. Official MuseTalk realtime avatar directories (docs/reference.md
§2.8) are imported as-is; their pickles are untrusted input and are loaded by a restricted unpickler.
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from musetalk_ops import PREPARATION_VERSION
from musetalk_ops.blend import Box
from musetalk_ops.errors import CacheError, InputError
from musetalk_ops.files import sha256_file
from musetalk_ops.ids import validate_id
from musetalk_ops.keys import MANIFEST
from musetalk_ops.options import VERSIONS
from musetalk_ops.sources import read_source

SCHEMA = "musetalk-template/1"
LATENTS = "latents.safetensors"
MASKS = "masks.npz"
PREVIEW = "preview.png"
CYCLES = ("pingpong", "none")
MASK_SOURCES = ("parsing-jaw", "parsing-raw", "landmarks")

LATENT_SHAPE = (8, 32, 32)
OFFICIAL_FPS = 25.0  # official realtime default (--fps 25); avatar directories do not record it
UNKNOWN_WEIGHTS = "unknown"  # an imported avatar does not say which weights made its latents

_SOURCE_FILE = re.compile(r"source\.[a-z0-9]{1,5}")


@dataclass(frozen=True)
class Face:
    """Where a frame's face goes: ``face_box`` (paste target, after extra_margin) and the square
    ``crop_box`` that the blending mask covers."""

    face_box: Box
    crop_box: Box


@dataclass
class Template:
    """A loaded template; ``faces[i] is None`` marks a frame without a face (passed through)."""

    id: str
    fps: float
    frames: np.ndarray
    cycle: str
    faces: list[Face | None]
    latents: torch.Tensor
    masks: list[np.ndarray | None]
    version: str
    weights: str
    fingerprint: str
    manifest: dict


def settings_sha256(settings: dict) -> str:
    """sha256 of the canonical JSON of ``settings`` (sorted keys, compact), so key order never matters."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def template_fingerprint(
    source_sha256: str, settings: dict, weights: str, preparation: int | None = PREPARATION_VERSION
) -> str:
    """16 hex naming a cache directory: any changed input (source, settings, weights, the preparation
    code) gives a new directory, never an overwrite. ``preparation`` is None for an official avatar,
    whose latents no code of ours made. The parts are hashed as a JSON list so no two different tuples
    can collide by concatenation."""
    parts = [SCHEMA, source_sha256, settings_sha256(settings), weights, preparation]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- write


def write_cache(
    out_dir: str | Path,
    *,
    template_id: str,
    source_path: str | Path,
    settings: dict,
    version: str,
    weights: str,
    fps: float,
    frame_size: Sequence[int],
    faces: Sequence[Face | None],
    latents: torch.Tensor,
    masks: Sequence[np.ndarray | None],
    cycle: str,
    mask_source: str,
    preview: np.ndarray,
    force: bool = False,
) -> Path:
    """Write a complete cache at ``out_dir`` atomically and return it. An existing complete cache is
    kept (CacheError) unless ``force``; then it is swapped for the new one in one rename each way."""
    out_dir = Path(out_dir)
    validate_id(template_id, "template id")
    _check_parts(version, cycle, mask_source, faces, latents, masks)
    if (out_dir / MANIFEST).exists() and not force:
        raise CacheError(f"template cache {out_dir} already exists (use --force to rebuild it)")
    source_path = Path(source_path)
    source_file = "source" + source_path.suffix.lower()
    if not _SOURCE_FILE.fullmatch(source_file):
        raise InputError(f"{source_path}: unsupported file name extension for a template source")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        shutil.copyfile(source_path, tmp / source_file)
        save_file({"latents": latents.detach().to("cpu").contiguous()}, str(tmp / LATENTS))
        np.savez_compressed(tmp / MASKS, **{f"mask_{i:05d}": m for i, m in enumerate(masks) if m is not None})
        Image.fromarray(preview).save(tmp / PREVIEW)
        for name in (source_file, LATENTS, MASKS, PREVIEW):
            _fsync(tmp / name)
        manifest = {
            "schema": SCHEMA,
            "id": template_id,
            "source": {"file": source_file, "sha256": sha256_file(tmp / source_file)},
            "settings": settings,
            "settings_sha256": settings_sha256(settings),
            "preparation_version": PREPARATION_VERSION,
            "model": {"version": version, "weights": weights},
            "fps": float(fps),
            "frame_size": [int(frame_size[0]), int(frame_size[1])],
            "frames": len(faces),
            "cycle": cycle,
            "mask_source": mask_source,
            "faces": [_face_json(face) for face in faces],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out_dir.parent)
    return out_dir


def _check_parts(version, cycle, mask_source, faces, latents, masks) -> None:
    """Programming errors in the caller (prepare), not user errors: ValueError."""
    if version not in VERSIONS or cycle not in CYCLES or mask_source not in MASK_SOURCES:
        raise ValueError(f"bad version/cycle/mask_source {version!r}/{cycle!r}/{mask_source!r}")
    n = len(faces)
    if n == 0 or len(masks) != n or tuple(latents.shape) != (n, *LATENT_SHAPE):
        raise ValueError(f"{n} faces, {len(masks)} masks and latents {tuple(latents.shape)} disagree")
    for i, (face, mask) in enumerate(zip(faces, masks, strict=True)):
        if (face is None) != (mask is None):
            raise ValueError(f"frame {i}: a mask is needed exactly when there is a face")
        if face is not None and (mask.dtype != np.uint8 or mask.shape != _box_shape(face.crop_box)):
            raise ValueError(f"frame {i}: mask {mask.dtype} {mask.shape} for crop box {face.crop_box}")


def _box_shape(box: Sequence[int]) -> tuple[int, int]:
    return (box[3] - box[1], box[2] - box[0])


def _face_json(face: Face | None) -> dict | None:
    if face is None:
        return None
    return {"face_box": [int(v) for v in face.face_box], "crop_box": [int(v) for v in face.crop_box]}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing directory is first renamed aside, so a reader sees
    the old cache, no cache, or the new one — never a mixture."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------- read


def load_template(path: str | Path) -> Template:
    """A cache directory (manifest.json) or an official realtime avatar directory (avator_info.json)."""
    path = Path(path)
    if not (path / MANIFEST).exists() and (path / "avator_info.json").exists():
        return import_official_avatar(path)
    return read_cache(path)


def read_cache(path: str | Path) -> Template:
    """Load and verify a cache: every file present and intact, made by this preparation version."""
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"no template cache at {path}")
    if not (path / MANIFEST).is_file():
        if any((path / name).exists() for name in (LATENTS, MASKS, PREVIEW)):
            raise CacheError(f"partial cache {path} (no manifest.json): re-run musetalk prepare")
        raise CacheError(
            f"{path} holds no template cache (manifest.json) or official avatar (avator_info.json)"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"damaged cache {path}: unreadable manifest.json ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        shown = manifest.get("schema") if isinstance(manifest, dict) else None
        raise CacheError(f"cache {path} has schema {shown!r}, not {SCHEMA!r}: re-run musetalk prepare")
    _check_preparation(path, manifest.get("preparation_version"))
    try:
        parsed = _parse_manifest(manifest)
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise CacheError(f"damaged cache {path}: invalid manifest.json ({e!r})") from None
    source_file, faces, fps, frame_size = parsed
    for name in (source_file, LATENTS, MASKS, PREVIEW):
        if not (path / name).is_file():
            raise CacheError(f"damaged cache {path}: {name} is missing: re-run musetalk prepare")
    if sha256_file(path / source_file) != manifest["source"]["sha256"]:
        raise CacheError(f"damaged cache {path}: {source_file} changed since the cache was made (sha256)")
    if settings_sha256(manifest["settings"]) != manifest["settings_sha256"]:
        raise CacheError(f"damaged cache {path}: settings do not match settings_sha256")
    latents = _read_latents(path, len(faces))
    masks = _read_masks(path, faces)
    try:
        frames = read_source(path / source_file, fps=fps).frames
    except InputError as e:
        raise CacheError(f"damaged cache {path}: {e}") from None
    if len(frames) != len(faces) or [frames.shape[2], frames.shape[1]] != frame_size:
        raise CacheError(
            f"damaged cache {path}: source decodes to {len(frames)} frames of "
            f"{frames.shape[2]}×{frames.shape[1]}, manifest says {len(faces)} of {frame_size}"
        )
    model = manifest["model"]
    return Template(
        id=manifest["id"],
        fps=fps,
        frames=frames,
        cycle=manifest["cycle"],
        faces=faces,
        latents=latents,
        masks=masks,
        version=model["version"],
        weights=model["weights"],
        fingerprint=template_fingerprint(
            manifest["source"]["sha256"], manifest["settings"], model["weights"]
        ),
        manifest=manifest,
    )


def _check_preparation(path: Path, version: Any) -> None:
    """CacheError unless the cache was made by this preparation version (older manifests name none)."""
    if version == PREPARATION_VERSION:
        return
    if isinstance(version, int) and version > PREPARATION_VERSION:
        raise CacheError(
            f"cache {path} was made by a newer preparation (version {version}, this is "
            f"{PREPARATION_VERSION}): upgrade musetalk or re-run musetalk prepare --force"
        )
    raise CacheError(f"cache {path} was made by an older preparation: re-run musetalk prepare --force")


def _parse_manifest(m: dict) -> tuple[str, list[Face | None], float, list[int]]:
    """Type-check what the reader relies on; KeyError/TypeError/ValueError mean a damaged manifest."""
    validate_id(m["id"], "template id")
    source_file = m["source"]["file"]
    if not isinstance(source_file, str) or not _SOURCE_FILE.fullmatch(source_file):
        raise ValueError(f"source.file {source_file!r}")
    if not isinstance(m["source"]["sha256"], str) or not isinstance(m["settings"], dict):
        raise ValueError("source.sha256 or settings")
    if m["model"]["version"] not in VERSIONS or not isinstance(m["model"]["weights"], str):
        raise ValueError("model")
    if m["cycle"] not in CYCLES or m["mask_source"] not in MASK_SOURCES:
        raise ValueError("cycle or mask_source")
    fps = float(m["fps"])
    frame_size = [int(v) for v in m["frame_size"]]
    faces = [None if f is None else Face(_box(f["face_box"]), _box(f["crop_box"])) for f in m["faces"]]
    if fps <= 0 or len(frame_size) != 2 or len(faces) != m["frames"] or not faces:
        raise ValueError("fps, frame_size or frames")
    return source_file, faces, fps, frame_size


def _box(values: Any) -> Box:
    if not isinstance(values, list | tuple) or len(values) != 4:
        raise ValueError(f"box {values!r}")
    x1, y1, x2, y2 = (_box_value(v) for v in values)
    return (x1, y1, x2, y2)


def _box_value(v: Any) -> int:
    """Python/numpy integers, or integral floats (the official no-face placeholder is 0.0s)."""
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        raise ValueError(f"box value {v!r}")
    if isinstance(v, float | np.floating) and not float(v).is_integer():
        raise ValueError(f"box value {v!r}")
    return int(v)


def _read_latents(path: Path, n: int) -> torch.Tensor:
    try:
        tensors = load_file(str(path / LATENTS))
    except (SafetensorError, OSError) as e:
        raise CacheError(f"damaged cache {path}: unreadable {LATENTS} ({e})") from None
    latents = tensors.get("latents")
    if latents is None or tuple(latents.shape) != (n, *LATENT_SHAPE) or not latents.is_floating_point():
        shown = None if latents is None else tuple(latents.shape)
        raise CacheError(f"damaged cache {path}: {LATENTS} holds {shown}, expected {(n, *LATENT_SHAPE)}")
    return latents.float()


def _read_masks(path: Path, faces: list[Face | None]) -> list[np.ndarray | None]:
    try:
        with np.load(path / MASKS, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CacheError(f"damaged cache {path}: unreadable {MASKS} ({e})") from None
    expected = {f"mask_{i:05d}" for i, face in enumerate(faces) if face is not None}
    if set(arrays) != expected:
        raise CacheError(f"damaged cache {path}: {MASKS} does not hold one mask per face")
    masks: list[np.ndarray | None] = []
    for i, face in enumerate(faces):
        mask = None if face is None else arrays[f"mask_{i:05d}"]
        if mask is not None and (mask.dtype != np.uint8 or mask.shape != _box_shape(face.crop_box)):
            raise CacheError(
                f"damaged cache {path}: mask {i} is {mask.dtype} {mask.shape}, not the crop size"
            )
        masks.append(mask)
    return masks


# ------------------------------------------------------------------------- official avatar import


# The reconstructor numpy pickles scalars with, found without importing numpy's private modules.
_numpy_scalar = np.int64(0).__reduce__()[0]


class _BoxUnpickler(pickle.Unpickler):
    """Only what a pickled list of (numpy) integer boxes needs; any other global is refused, so a
    crafted coords.pkl cannot run code."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # written by numpy 1.x
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # written by numpy 2.x
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _load_boxes(file: Path) -> list[Box]:
    try:
        data = _BoxUnpickler(io.BytesIO(file.read_bytes())).load()
    except FileNotFoundError:
        raise CacheError(f"official avatar {file.parent}: {file.name} is missing") from None
    except Exception as e:  # an untrusted pickle can fail in any way; all of them mean "not boxes"
        raise CacheError(f"official avatar {file.parent}: {file.name} is not a list of boxes ({e})") from None
    try:
        if not isinstance(data, list | tuple):
            raise ValueError(f"a {type(data).__name__}")
        return [_box(box) for box in data]
    except ValueError as e:
        raise CacheError(f"official avatar {file.parent}: {file.name} is not a list of boxes ({e})") from None


def _numbered_images(folder: Path) -> dict[int, Path]:
    """Official ``%08d.png`` files keyed by number (the official code sorts by the integer stem)."""
    if not folder.is_dir():
        raise CacheError(f"official avatar {folder.parent}: {folder.name}/ is missing")
    return {
        int(p.stem): p
        for p in folder.iterdir()
        if p.stem.isdigit() and p.suffix.lower() in (".png", ".jpg", ".jpeg")
    }


def _decode_image(file: Path, digest: Any) -> np.ndarray:
    """3-channel BGR, as the official code's ``cv2.imread``."""
    import cv2  # 0.3 s to import: only official avatar imports need it, not a render

    data = file.read_bytes()
    digest.update(data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CacheError(f"official avatar: {file} is not a readable image")
    return image


def _read_official_latents(file: Path, n: int, digest: Any) -> torch.Tensor:
    try:
        data = file.read_bytes()
        items = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CacheError(f"official avatar {file.parent}: latents.pt is missing") from None
    except Exception as e:  # torch.load of an untrusted file: any failure means a damaged file
        raise CacheError(f"official avatar {file.parent}: unreadable latents.pt ({e})") from None
    digest.update(data)
    ok = (
        isinstance(items, list | tuple)
        and len(items) == n
        and all(
            isinstance(t, torch.Tensor) and t.shape[-3:] == LATENT_SHAPE and t.numel() == 8 * 32 * 32
            for t in items
        )
    )
    if not ok:
        raise CacheError(
            f"official avatar {file.parent}: latents.pt is not a list of {n} [1,8,32,32] tensors"
        )
    return torch.cat([t.reshape(1, *LATENT_SHAPE) for t in items]).float()


def import_official_avatar(path: str | Path) -> Template:
    """Load an official realtime avatar directory as-is: its 2N frames already form the cycle
    (``cycle`` "none") and its boxes already include extra_margin. A zero-area box (the official
    no-face placeholder) becomes a pass-through frame."""
    path = Path(path)
    try:
        info = json.loads((path / "avator_info.json").read_text())
        avatar_id = validate_id(info["avatar_id"], "avatar_id")
        version = info.get("version", "v1")  # the pre-v1.5 code wrote no version
    except FileNotFoundError:
        raise CacheError(f"{path} is not an official avatar directory (no avator_info.json)") from None
    except (OSError, ValueError, KeyError, TypeError, InputError) as e:
        raise CacheError(f"official avatar {path}: bad avator_info.json ({e})") from None
    if version not in VERSIONS:
        raise CacheError(f"official avatar {path}: unknown version {version!r} in avator_info.json")
    boxes = _load_boxes(path / "coords.pkl")
    crops = _load_boxes(path / "mask_coords.pkl")
    frame_files = _numbered_images(path / "full_imgs")
    n = len(boxes)
    if len(crops) != n or sorted(frame_files) != list(range(n)) or n == 0:
        raise CacheError(
            f"official avatar {path}: {n} boxes, {len(crops)} crop boxes and {len(frame_files)} frames "
            "(full_imgs/00000000.png …) do not match"
        )
    digest = hashlib.sha256()
    frames = [_decode_image(frame_files[i], digest)[..., ::-1] for i in range(n)]
    if any(f.shape != frames[0].shape for f in frames):
        raise CacheError(f"official avatar {path}: full_imgs frames differ in size")
    latents = _read_official_latents(path / "latents.pt", n, digest)
    mask_files = _numbered_images(path / "mask")
    faces: list[Face | None] = []
    masks: list[np.ndarray | None] = []
    for i, (box, crop) in enumerate(zip(boxes, crops, strict=True)):
        if box[2] <= box[0] or box[3] <= box[1]:
            faces.append(None)
            masks.append(None)
            continue
        if i not in mask_files:
            raise CacheError(f"official avatar {path}: mask/{i:08d}.png is missing")
        # Official: cv2.imread (3-channel BGR) then PIL convert("L") at blend time; do the same.
        bgr = _decode_image(mask_files[i], digest)
        mask = np.asarray(Image.fromarray(bgr).convert("L"))
        if mask.shape != _box_shape(crop):
            raise CacheError(f"official avatar {path}: mask {i} is {mask.shape}, crop box {crop}")
        faces.append(Face(box, crop))
        masks.append(mask)
    settings = {"avatar_info": info}
    weights = UNKNOWN_WEIGHTS
    frame_array = np.stack(frames)
    manifest = {
        "schema": "official-avatar",
        "id": avatar_id,
        "source": {"file": str(path), "sha256": digest.hexdigest()},
        "settings": settings,
        "settings_sha256": settings_sha256(settings),
        "preparation_version": None,  # official latents and masks, kept as they are
        "model": {"version": version, "weights": weights},
        "fps": OFFICIAL_FPS,
        "frame_size": [frame_array.shape[2], frame_array.shape[1]],
        "frames": n,
        "cycle": "none",
        "mask_source": "parsing-jaw" if version == "v15" else "parsing-raw",
        "faces": [_face_json(face) for face in faces],
    }
    return Template(
        id=avatar_id,
        fps=OFFICIAL_FPS,
        frames=frame_array,
        cycle="none",
        faces=faces,
        latents=latents,
        masks=masks,
        version=version,
        weights=weights,
        fingerprint=template_fingerprint(digest.hexdigest(), settings, weights, preparation=None),
        manifest=manifest,
    )

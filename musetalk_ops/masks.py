"""Blending masks: which pixels of the crop box the generated face replaces (docs/reference.md §2.9–2.10).

The official v1.5 mask comes from BiSeNet face parsing in ``jaw`` mode: skin grown upwards by a
cone kernel, pulled in at the cheeks, nose cut out, mouth and lips always in. It is then resized to
the crop box, limited to the face box, cleared above the face-box centre line and blurred. The
landmark mask is an explicit alternative for setups without BiSeNet weights.
"""

import cv2
import numpy as np
from PIL import Image

from musetalk_ops.blend import Box

PARSE_SIZE = 512
SKIN, NOSE = 1, 10
MOUTH_LABELS = (11, 12, 13)  # mouth, upper lip, lower lip (CelebAMask-HQ order)
RAW_LABELS = (SKIN, *MOUTH_LABELS)
UPPER_BOUNDARY_RATIO = 0.5
BLUR_RATIO = 0.1  # cached/realtime path; the official per-frame path uses 0.05
# Lower face for ``mask_source: landmarks``: jaw contour 2..14 (below the ears), then the nose's bottom
# edge 35..31 back to the start; the post-processing keeps only its part below the face-box centre.
LOWER_FACE_POINTS = (*range(2, 15), 35, 34, 33, 32, 31)


def cone_kernel() -> np.ndarray:
    """The 33×33 ``jaw`` dilation kernel: rows 0–9 empty, rows 10–20 centred runs 1, 3, …, 21 wide,
    rows 21–32 21 wide (373 ones). Dilating with it grows skin up to 16 px upwards and 6 px down."""
    rows = np.arange(33)[:, None]
    cols = np.arange(33)[None, :]
    half_width = np.minimum(rows - 10, 10)
    return ((rows >= 10) & (np.abs(cols - 16) <= half_width)).astype(np.uint8)


K_CONE = cone_kernel()
K_CHEEK = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


def cheek_mask(left_cheek_width: int = 90, right_cheek_width: int = 90) -> np.ndarray:
    """255 in the two cheek zones of the 512² parse map: columns [0, 256−left] and [256+right, 511]."""
    mask = np.zeros((PARSE_SIZE, PARSE_SIZE), np.uint8)
    centre = PARSE_SIZE // 2
    cv2.rectangle(mask, (0, 0), (centre - left_cheek_width, PARSE_SIZE), 255, cv2.FILLED)
    cv2.rectangle(mask, (centre + right_cheek_width, 0), (PARSE_SIZE, PARSE_SIZE), 255, cv2.FILLED)
    return mask


def parse_mask(
    labels: np.ndarray, mode: str = "jaw", left_cheek_width: int = 90, right_cheek_width: int = 90
) -> np.ndarray:
    """{0, 255} mask from a 512² BiSeNet label map.

    ``raw``: skin, mouth and lips. ``jaw``: skin dilated with the cone kernel, eroded twice with the
    35×3 ellipse inside the cheek zones, the nose excluded, then mouth and lips added.
    """
    if mode == "raw":
        return np.where(np.isin(labels, RAW_LABELS), 255, 0).astype(np.uint8)
    if mode != "jaw":
        raise ValueError(f"unknown parsing mode {mode!r}")
    skin = np.where(labels == SKIN, 255, 0).astype(np.uint8)
    grown = cv2.dilate(skin, K_CONE, iterations=1)
    shrunk = cv2.erode(grown, K_CHEEK, iterations=2)
    cheeks = cheek_mask(left_cheek_width, right_cheek_width)
    region = (shrunk & cheeks) | (grown & ~cheeks)
    keep = ((region == 255) & (labels != NOSE)) | np.isin(labels, MOUTH_LABELS)
    return np.where(keep, 255, 0).astype(np.uint8)


def blur_kernel_size(width: int, ratio: float = BLUR_RATIO) -> int:
    """Official odd Gaussian kernel size ``int(ratio·W // 2 * 2) + 1`` (W 256 → 25 at ratio 0.1)."""
    return int(ratio * width // 2 * 2) + 1


def _finish(mask: np.ndarray, face_box: Box, crop_box: Box) -> np.ndarray:
    """Official steps 3–5: keep the face box only, clear rows above the crop centre, blur."""
    x1, y1, x2, y2 = face_box
    cx, cy = crop_box[0], crop_box[1]
    height, width = mask.shape
    out = np.zeros_like(mask)
    rows = slice(max(y1 - cy, 0), min(y2 - cy, height))
    cols = slice(max(x1 - cx, 0), min(x2 - cx, width))
    out[rows, cols] = mask[rows, cols]
    out[: int(height * UPPER_BOUNDARY_RATIO)] = 0
    k = blur_kernel_size(width)
    return cv2.GaussianBlur(out, (k, k), 0)


def blending_mask(seg512: np.ndarray, face_box: Box, crop_box: Box) -> np.ndarray:
    """Blending mask of crop-box size from a 512² {0, 255} parse mask (PIL bicubic resize, as official)."""
    size = (crop_box[2] - crop_box[0], crop_box[3] - crop_box[1])
    resized = np.asarray(Image.fromarray(seg512, "L").resize(size, Image.Resampling.BICUBIC))
    return _finish(resized, face_box, crop_box)


def landmark_mask(lm: np.ndarray, face_box: Box, crop_box: Box) -> np.ndarray:
    """Blending mask of crop-box size from the lower-face polygon of the 68 landmarks."""
    size = (crop_box[3] - crop_box[1], crop_box[2] - crop_box[0])
    polygon = np.asarray(lm, np.int32)[list(LOWER_FACE_POINTS)] - np.array(crop_box[:2], np.int32)
    mask = np.zeros(size, np.uint8)
    cv2.fillPoly(mask, [polygon.reshape(-1, 1, 2)], 255)
    return _finish(mask, face_box, crop_box)

"""Paste-back: put a generated 256² face into its template frame exactly as the official code does.

The official realtime path (docs/reference.md §2.10, P12/P13/P16) resizes the face with OpenCV, pastes it into
a PIL crop of the frame and pastes that crop back through an "L" matte. Only the face box can change
(elsewhere the crop holds the frame's own pixels and blending a pixel with itself is the identity),
so we compute the same integer arithmetic on the face-box region alone instead of full-frame PIL
copies — bit-identical and much cheaper.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np

Box = tuple[int, int, int, int]


def crop_box_for(face_box: Sequence[int], expand: float = 1.5) -> Box:
    """Official ``get_crop_box``: a square of side 2s around the face box's (floored) centre."""
    x1, y1, x2, y2 = (int(v) for v in face_box)
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    return (xc - s, yc - s, xc + s, yc + s)


def pil_blend(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pillow's "L"-matte paste per channel: DIV255(dst·(255−m) + src·m), rounded as Pillow rounds.

    ``mask`` [H, W] is broadcast over the channels of [H, W, C] images. All intermediate values
    stay below 2¹⁶, so uint16 arithmetic is exact."""
    m = mask.astype(np.uint16)
    if m.ndim == dst.ndim - 1:
        m = m[..., None]
    a = dst.astype(np.uint16) * (255 - m) + src.astype(np.uint16) * m + 128
    return ((a + (a >> 8)) >> 8).astype(np.uint8)


def paste_region(
    face_box: Sequence[int], crop_box: Sequence[int], mask_shape: Sequence[int], frame_shape: Sequence[int]
) -> Box:
    """The pixels a paste can change: face box ∩ crop box ∩ frame (empty when x2 == x1 or y2 == y1),
    after checking that the face box is not empty and the mask has the crop box's size. Shared by
    the CPU reference (``paste_face``) and the device paste-back so both touch exactly the same pixels."""
    x1, y1, x2, y2 = (int(v) for v in face_box)
    cx1, cy1, cx2, cy2 = (int(v) for v in crop_box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty face box {tuple(face_box)}")
    if tuple(mask_shape) != (cy2 - cy1, cx2 - cx1):
        raise ValueError(f"mask {tuple(mask_shape)} does not match crop box {tuple(crop_box)}")
    height, width = frame_shape[:2]
    rx1, ry1 = max(x1, cx1, 0), max(y1, cy1, 0)
    return rx1, ry1, max(min(x2, cx2, width), rx1), max(min(y2, cy2, height), ry1)


def paste_face(
    frame: np.ndarray, face: np.ndarray, face_box: Sequence[int], mask: np.ndarray, crop_box: Sequence[int]
) -> np.ndarray:
    """Official ``get_image_blending``: returns a new frame with ``face`` (any size, RGB) resized with
    INTER_LINEAR to the face box and blended through ``mask`` (uint8, the crop box's size).

    PIL zero-fills a crop outside the frame and clips pastes at every edge; the pixels that can
    change are therefore face box ∩ crop box ∩ frame, and nothing else is touched."""
    x1, y1, x2, y2 = (int(v) for v in face_box)
    cx1, cy1 = int(crop_box[0]), int(crop_box[1])
    rx1, ry1, rx2, ry2 = paste_region(face_box, crop_box, mask.shape, frame.shape)
    out = frame.copy()
    if rx1 >= rx2 or ry1 >= ry2:
        return out
    import cv2  # 0.3 s to import: the fast render path never pastes here

    resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    out[ry1:ry2, rx1:rx2] = pil_blend(
        frame[ry1:ry2, rx1:rx2],
        resized[ry1 - y1 : ry2 - y1, rx1 - x1 : rx2 - x1],
        mask[ry1 - cy1 : ry2 - cy1, rx1 - cx1 : rx2 - cx1],
    )
    return out


def frame_indices(start: int, stop: int, n: int, cycle: Literal["pingpong", "none"]) -> np.ndarray:
    """Template frame for each output frame in [start, stop): "pingpong" plays 0..N−1 then N−1..0
    (a cycle of 2N, docs/reference.md §2.7), "none" repeats 0..N−1 (an imported cycle is already unrolled)."""
    if n <= 0:
        raise ValueError(f"a template needs at least one frame, got {n}")
    i = np.arange(start, stop, dtype=np.int64)
    if cycle == "none":
        return i % n
    if cycle == "pingpong":
        k = i % (2 * n)
        return np.where(k < n, k, 2 * n - 1 - k)
    raise ValueError(f"unknown cycle {cycle!r}: use 'pingpong' or 'none'")

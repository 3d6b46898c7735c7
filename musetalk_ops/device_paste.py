"""Paste-back on the model's device: the same pixels as ``blend.paste_face``, computed where the faces are.

The fast render path keeps decoded faces on the GPU, resizes and blends only the face region there and
copies just that region back, instead of copying 256² faces to the host and compositing in Python.
Both steps reproduce the reference in integer arithmetic, so on any device the result equals
``paste_face`` bit for bit (tests/test_fast_path.py checks it on the CPU, the benchmark on the GPU):

* the resize is OpenCV's ``INTER_LINEAR`` for uint8 images: 11-bit fixed-point weights rounded from
  float32 (source x clamped to the image, source y not, its rows clamped instead), a horizontal pass
  in int32, then the vertical pass as OpenCV's SIMD kernel rounds it: ``(((S0>>4)·b0)>>16) +
  (((S1>>4)·b1)>>16) + 2) >> 2``;
* the blend is Pillow's "L"-matte paste, ``DIV255(dst·(255−m) + src·m)``, exact in int32.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from musetalk_ops.blend import Box, paste_region
from musetalk_ops.cache import Template

COEF_SCALE = 1 << 11  # OpenCV's INTER_RESIZE_COEF_SCALE


def linear_taps(src: int, dst: int, *, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR source indices and fixed-point weights along one axis of ``src → dst``.

    Returns (i0, i1, w0, w1) with ``out[d] ≈ (in[i0]·w0 + in[i1]·w1) / 2048``. ``clamp`` is OpenCV's
    treatment of the x axis (a position left of pixel 0 or right of the last one takes that pixel
    whole); along y it keeps the fractional weight and clamps the row indices instead.
    """
    pos = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp:
        frac[first < 0] = 0
        first[first < 0] = 0
        last = first >= src - 1
        frac[last] = 0
        first[last] = src - 1
    scale = np.float32(COEF_SCALE)
    w0 = np.rint((np.float32(1) - frac) * scale).astype(np.int32)
    w1 = np.rint(frac * scale).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def _vertical(s0: torch.Tensor, s1: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """OpenCV's vertical INTER_LINEAR pass on int32 row sums (scale 2048) → uint8."""
    v = (((s0 >> 4) * b0) >> 16) + (((s1 >> 4) * b1) >> 16)
    return ((v + 2) >> 2).clamp_(0, 255)


def resize_linear(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` for uint8 [..., H, W, C]."""
    src_h, src_w = image.shape[-3:-1]
    return _Resize(src_w, src_h, width, height, (0, 0, width, height), image.device)(image)


class _Resize:
    """INTER_LINEAR of ``src → (width, height)``, evaluated only on ``window`` (x1, y1, x2, y2 in the
    output): the region that the blend keeps."""

    def __init__(self, src_w: int, src_h: int, width: int, height: int, window: Box, device: torch.device):
        x1, y1, x2, y2 = window
        xs0, xs1, a0, a1 = (t[x1:x2] for t in linear_taps(src_w, width, clamp=True))
        ys0, ys1, b0, b1 = (t[y1:y2] for t in linear_taps(src_h, height, clamp=False))

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        self.xs0, self.xs1, self.ys0, self.ys1 = put(xs0), put(xs1), put(ys0), put(ys1)
        self.a0, self.a1 = put(a0)[:, None], put(a1)[:, None]
        self.b0, self.b1 = put(b0)[:, None, None], put(b1)[:, None, None]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [..., H, W, C] → int32 [..., y2−y1, x2−x1, C] (values 0–255)."""
        x = image.to(torch.int32)
        rows = x[..., self.xs0, :] * self.a0 + x[..., self.xs1, :] * self.a1  # [..., H, w, C]
        return _vertical(rows[..., self.ys0, :, :], rows[..., self.ys1, :, :], self.b0, self.b1)


def pil_blend_(dst: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pillow's "L"-matte paste in int32, written back into ``src`` (int32, 0–255) and returned as uint8.

    ``dst`` uint8 [..., H, W, C], ``mask`` [H, W] (any integer dtype)."""
    m = mask.to(torch.int32)[..., None]
    a = src.mul_(m).add_(dst.to(torch.int32) * (255 - m)).add_(128)
    return a.add_(a >> 8).bitwise_right_shift_(8).to(torch.uint8)


@dataclass(frozen=True)
class _Plan:
    """Everything the blend of one template frame needs, resident on the device."""

    region: Box  # frame pixels that can change: face box ∩ crop box ∩ frame
    resize: _Resize | None  # None when the region is empty
    frame: torch.Tensor  # uint8 [h, w, 3]: the template frame's pixels in ``region``
    mask: torch.Tensor  # uint8 [h, w]: the mask under ``region``

    @property
    def shape(self) -> tuple[int, int, int]:
        x1, y1, x2, y2 = self.region
        return (y2 - y1, x2 - x1, 3)


class DevicePaster:
    """Composites generated faces into a template's face regions on ``device``.

    Per template frame the region, resize taps, frame pixels and mask are built once (lazily) and kept
    on the device, so a chunk uploads each template frame's face region at most once.
    """

    def __init__(self, template: Template, device: torch.device) -> None:
        self.template, self.device = template, device
        self._plans: dict[int, _Plan] = {}

    def plan(self, k: int) -> _Plan:
        if k not in self._plans:
            self._plans[k] = self._build(k)
        return self._plans[k]

    def _build(self, k: int) -> _Plan:
        face, mask, frame = self.template.faces[k], self.template.masks[k], self.template.frames[k]
        if face is None or mask is None:
            raise ValueError(f"template frame {k} has no face to paste into")
        x1, y1, x2, y2 = face.face_box
        cx1, cy1 = face.crop_box[:2]
        rx1, ry1, rx2, ry2 = paste_region(face.face_box, face.crop_box, mask.shape, frame.shape)
        resize = None
        if rx2 > rx1 and ry2 > ry1:
            window = (rx1 - x1, ry1 - y1, rx2 - x1, ry2 - y1)
            resize = _Resize(256, 256, x2 - x1, y2 - y1, window, self.device)
        return _Plan(
            region=(rx1, ry1, rx2, ry2),
            resize=resize,
            frame=torch.from_numpy(np.ascontiguousarray(frame[ry1:ry2, rx1:rx2])).to(self.device),
            mask=torch.from_numpy(
                np.ascontiguousarray(mask[ry1 - cy1 : ry2 - cy1, rx1 - cx1 : rx2 - cx1])
            ).to(self.device),
        )

    def composite(self, faces: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
        """Blended regions (uint8 [h, w, 3] on the device), one per face in ``faces`` [n, 256, 256, 3].

        Faces that go into the same template frame are resized and blended as one batch; when they are
        adjacent in ``faces`` (sort by template frame) the batch is a view, with no host-to-device copy.
        """
        if faces.shape[1:] != (256, 256, 3) or len(ks) != len(faces):
            raise ValueError(
                f"composite wants uint8 [n,256,256,3] faces and n frame indices, got {faces.shape}"
            )
        out: list[torch.Tensor | None] = [None] * len(ks)
        groups: dict[int, list[int]] = {}
        for j, k in enumerate(ks):
            groups.setdefault(int(k), []).append(j)
        for k, rows in groups.items():
            plan = self.plan(k)
            if plan.resize is None:
                blended = plan.frame.expand(len(rows), *plan.frame.shape)
            else:
                first, last = rows[0], rows[-1] + 1
                contiguous = rows == list(range(first, last))  # callers sort by frame: no index upload
                picked = faces[first:last] if contiguous else faces[torch.tensor(rows, device=faces.device)]
                blended = pil_blend_(plan.frame, plan.resize(picked), plan.mask)
            for j, region in zip(rows, blended, strict=True):
                out[j] = region
        return out  # type: ignore[return-value]

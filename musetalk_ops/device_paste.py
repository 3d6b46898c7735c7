"""Paste-back on the model's device: the same pixels as ``blend.paste_face``, computed where the faces are.

The fast render path keeps decoded faces on the GPU, resizes and blends only the face region there,
converts the block of the frame that changes to YUV 4:2:0 (``yuv.py``) and copies just that back,
instead of copying 256² faces to the host and compositing and converting whole frames on the CPU.
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
from musetalk_ops.yuv import i420, rgb_to_yuv420

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
    """Everything the blend of one template frame needs, resident on the device.

    ``block`` is the region grown to even coordinates of the encoded (even-sized) frame and by one
    chroma row above and below (the vertical chroma filter there reads the region's edge rows): the
    frame's YUV 4:2:0 changes only inside it, so it converts on its own. Its canvas carries one more
    row above and below as that filter's context. Canvas pixels come from ``local`` (the real frame
    pixels they need, face blended in) through ``rows``/``cols``, which repeat the last real
    row/column where the encoder pads an odd frame and the first/last row beyond the frame's
    borders, as the conversion of a whole frame does.
    """

    region: Box  # frame pixels that can change: face box ∩ crop box ∩ frame
    block: Box  # the region on the even grid of the encoded frame (x1, y1, x2, y2; empty with the region)
    resize: _Resize | None  # None when the region is empty
    local: torch.Tensor  # uint8 [lh, lw, 3]: the frame's pixels that the canvas reads
    offset: tuple[int, int]  # (y, x) of the region in ``local``
    rows: torch.Tensor  # int64 [bh + 2]: canvas row → row of ``local``
    cols: torch.Tensor  # int64 [bw]: canvas column → column of ``local``
    mask: torch.Tensor  # uint8 [h, w]: the mask under ``region``

    @property
    def shape(self) -> tuple[int, int, int]:
        x1, y1, x2, y2 = self.region
        return (y2 - y1, x2 - x1, 3)


@dataclass(frozen=True)
class Blended:
    """Faces blended into one template frame ``k``: ``canvas[j]`` belongs to ``positions[j]`` of the
    ``composite`` call; uint8 [n, bh + 2, bw, 3] over ``DevicePaster.plan(k).block`` with its context
    rows (None when the paste region is empty: the frame is the template's own)."""

    k: int
    positions: list[int]
    canvas: torch.Tensor | None


class DevicePaster:
    """Composites generated faces into a template's face regions on ``device``.

    Per template frame the region, resize taps, frame pixels and mask are built once (lazily) and kept
    on the device, so a chunk uploads each template frame's face surroundings at most once.
    """

    def __init__(self, template: Template, device: torch.device) -> None:
        self.template, self.device = template, device
        self._plans: dict[int, _Plan] = {}
        height, width = template.frames.shape[1:3]
        self.size = (width, height)
        self.coded_size = (width + width % 2, height + height % 2)

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
        resize, block = None, (rx1, ry1, rx1, ry1)
        if rx2 > rx1 and ry2 > ry1:
            window = (rx1 - x1, ry1 - y1, rx2 - x1, ry2 - y1)
            resize = _Resize(256, 256, x2 - x1, y2 - y1, window, self.device)
            # even grid; one chroma row more above and below: their filter reads the region's edge rows
            coded_h = self.coded_size[1]
            block = (rx1 - rx1 % 2, max(0, ry1 - ry1 % 2 - 2), rx2 + rx2 % 2, min(coded_h, ry2 + ry2 % 2 + 2))
        (width, height), (bx1, by1, bx2, by2) = self.size, block
        rows = np.clip(np.arange(by1 - 1, by2 + 1), 0, height - 1)  # context rows, pad row → real rows
        cols = np.minimum(np.arange(bx1, bx2), width - 1)
        ly1, lx1 = int(rows.min()), bx1
        local = frame[ly1 : int(rows.max()) + 1, lx1 : int(cols.max(initial=bx1)) + 1]
        return _Plan(
            region=(rx1, ry1, rx2, ry2),
            block=block,
            resize=resize,
            local=torch.from_numpy(np.ascontiguousarray(local)).to(self.device),
            offset=(ry1 - ly1, rx1 - lx1),
            rows=torch.from_numpy(rows - ly1).to(self.device),
            cols=torch.from_numpy(cols - lx1).to(self.device),
            mask=torch.from_numpy(
                np.ascontiguousarray(mask[ry1 - cy1 : ry2 - cy1, rx1 - cx1 : rx2 - cx1])
            ).to(self.device),
        )

    def composite(self, faces: torch.Tensor, ks: Sequence[int]) -> list[Blended]:
        """Blend ``faces`` (uint8 [n, 256, 256, 3] on the device) into template frames ``ks``; one
        ``Blended`` per distinct frame, in order of first appearance.

        Faces that go into the same template frame are resized and blended as one batch; when they are
        adjacent in ``faces`` (sort by template frame) the batch is a view, with no host-to-device copy.
        """
        if faces.shape[1:] != (256, 256, 3) or len(ks) != len(faces):
            raise ValueError(
                f"composite wants uint8 [n,256,256,3] faces and n frame indices, got {faces.shape}"
            )
        groups: dict[int, list[int]] = {}
        for j, k in enumerate(ks):
            groups.setdefault(int(k), []).append(j)
        out = []
        for k, rows in groups.items():
            plan = self.plan(k)
            if plan.resize is None:
                out.append(Blended(k, rows, None))
                continue
            first, last = rows[0], rows[-1] + 1
            contiguous = rows == list(range(first, last))  # callers sort by frame: no index upload
            picked = faces[first:last] if contiguous else faces[torch.tensor(rows, device=faces.device)]
            h, w, _ = plan.shape
            oy, ox = plan.offset
            local = plan.local.expand(len(rows), *plan.local.shape).clone()
            local[:, oy : oy + h, ox : ox + w] = pil_blend_(
                plan.local[oy : oy + h, ox : ox + w], plan.resize(picked), plan.mask
            )
            out.append(Blended(k, rows, local[:, plan.rows][:, :, plan.cols]))
        return out

    def background(self, k: int) -> np.ndarray:
        """Template frame ``k`` as the encoder takes it: padded to the coded size, converted to packed
        YUV 4:2:0 (``[H·3/2, W]``, see ``yuv.py``) on the device, on the host."""
        frame = self.template.frames[k]
        (width, height), (coded_w, coded_h) = self.size, self.coded_size
        frame = np.pad(frame, ((0, coded_h - height), (0, coded_w - width), (0, 0)), mode="edge")
        planes = rgb_to_yuv420(torch.from_numpy(frame).to(self.device))
        return i420(*(p.cpu().numpy() for p in planes))

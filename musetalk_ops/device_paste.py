"""Paste-back on the model's device: the same pixels as ``blend.paste_face``, computed where the faces are.

The fast render path keeps decoded faces on the GPU, resizes and blends only the face region there,
converts the block of the frame that changes to YUV 4:2:0 (``yuv.py``) and copies just that back,
instead of copying 256² faces to the host and compositing and converting whole frames on the CPU.
Both steps reproduce the reference in integer arithmetic, so on any device the result equals
``paste_face`` bit for bit (tests/engine/test_fast_path.py checks it on the CPU, the benchmark on the GPU):

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
from musetalk_ops.template_cache import Template
from musetalk_ops.yuv import i420, rgb_to_yuv420

COEF_SCALE = 1 << 11  # OpenCV's INTER_RESIZE_COEF_SCALE


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto ``device`` without making the host wait for the GPU (pinned, asynchronous)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


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


def _resize(x: torch.Tensor, cols: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """INTER_LINEAR of int32 images ``x`` [n, H, W, C] with per-image taps: ``cols`` = (x0, x1, a0, a1)
    each [n, w], ``rows`` = (y0, y1, b0, b1) each [n, h] (see ``linear_taps``) → int32 [n, h, w, C]."""
    n, height, _, channels = x.shape
    (x0, x1, a0, a1), (y0, y1, b0, b1) = cols, rows

    def column(i: torch.Tensor) -> torch.Tensor:
        return x.gather(2, i[:, None, :, None].expand(n, height, i.shape[1], channels))

    horizontal = column(x0) * a0[:, None, :, None] + column(x1) * a1[:, None, :, None]  # [n, H, w, C]

    def row(i: torch.Tensor) -> torch.Tensor:
        return horizontal.gather(1, i[:, :, None, None].expand(n, i.shape[1], *horizontal.shape[2:]))

    return _vertical(row(y0), row(y1), b0[:, :, None, None], b1[:, :, None, None])


def resize_linear(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` for uint8 [..., H, W, C]."""
    src_h, src_w, channels = image.shape[-3:]
    x = image.reshape(-1, src_h, src_w, channels).to(torch.int32)

    def taps(src: int, dst: int, clamp: bool) -> tuple[torch.Tensor, ...]:
        arrays = linear_taps(src, dst, clamp=clamp)
        return tuple(torch.from_numpy(a).to(image.device).expand(len(x), dst) for a in arrays)

    out = _resize(x, taps(src_w, width, True), taps(src_h, height, False))
    return out.reshape(*image.shape[:-3], height, width, channels)


def pil_blend_(dst: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pillow's "L"-matte paste in int32, written back into ``src`` (int32, 0–255) and returned as uint8.

    ``dst`` uint8 [..., H, W, C], ``mask`` [..., H, W] (any integer dtype)."""
    m = mask.to(torch.int32)[..., None]
    a = src.mul_(m).add_(dst.to(torch.int32) * (255 - m)).add_(128)
    return a.add_(a >> 8).bitwise_right_shift_(8).to(torch.uint8)


@dataclass(frozen=True)
class Plan:
    """Where the blend of one template frame lands.

    ``region`` holds the frame pixels that can change (face box ∩ crop box ∩ frame). ``block`` is the
    region grown to even coordinates of the encoded (even-sized) frame and by one chroma row above and
    below (the vertical chroma filter there reads the region's edge rows): the frame's YUV 4:2:0
    changes only inside it, so it converts on its own. Its canvas carries one more row above and below
    as that filter's context, and repeats the last real row/column where the encoder pads an odd frame
    and the first/last row beyond the frame's borders, as the conversion of a whole frame does.
    """

    region: Box
    block: Box  # x1, y1, x2, y2; empty (x2 == x1) with the region

    @property
    def empty(self) -> bool:
        return self.block[2] == self.block[0]


@dataclass(frozen=True)
class Composited:
    """Faces blended into their template frames, in the order given to ``composite``: ``canvas[j]``
    is ``plans[j].block`` with its context rows, uint8 [n, CH, CW, 3] padded to the largest block of
    the loaded frames (face ``j`` owns ``[:bh + 2, :bw]``); None when every block is empty."""

    canvas: torch.Tensor | None
    plans: list[Plan]


class DevicePaster:
    """Composites generated faces into a template's face regions on ``device``, a whole batch at once.

    ``load`` builds, for each template frame a chunk shows, its canvas background, blend mask and the
    resize taps expressed in canvas coordinates (zero weight and mask outside the region), padded to
    one shape and uploaded in one copy. A batch then blends every face with a few gathers whatever
    mix of template frames it holds: a video template's batch touches ~20 frames, which a loop per
    frame would pay for in small kernels.
    """

    def __init__(self, template: Template, device: torch.device) -> None:
        self.template, self.device = template, device
        height, width = template.frames.shape[1:3]
        self.size = (width, height)
        self.coded_size = (width + width % 2, height + height % 2)
        self._plans: dict[int, Plan] = {}
        self._slots = np.full(len(template.frames), -1, dtype=np.int64)
        self._tables: dict[str, torch.Tensor] = {}

    def plan(self, k: int) -> Plan:
        if k not in self._plans:
            face, mask, frame = self.template.faces[k], self.template.masks[k], self.template.frames[k]
            if face is None or mask is None:
                raise ValueError(f"template frame {k} has no face to paste into")
            rx1, ry1, rx2, ry2 = paste_region(face.face_box, face.crop_box, mask.shape, frame.shape)
            block = (rx1, ry1, rx1, ry1)
            if rx2 > rx1 and ry2 > ry1:
                bottom = min(self.coded_size[1], ry2 + ry2 % 2 + 2)
                block = (rx1 - rx1 % 2, max(0, ry1 - ry1 % 2 - 2), rx2 + rx2 % 2, bottom)
            self._plans[k] = Plan(region=(rx1, ry1, rx2, ry2), block=block)
        return self._plans[k]

    def load(self, frames: Sequence[int]) -> None:
        """Build the device tables of template frames ``frames`` (each must have a face); call before
        the GPU is busy: the upload waits for the device."""
        frames = sorted({int(k) for k in frames})
        plans = [self.plan(k) for k in frames]
        ch = max((p.block[3] - p.block[1] + 2 for p in plans if not p.empty), default=0)
        cw = max((p.block[2] - p.block[0] for p in plans if not p.empty), default=0)
        n = len(frames)
        host = {
            "background": np.zeros((n, ch, cw, 3), np.uint8),
            "mask": np.zeros((n, ch, cw), np.uint8),
            **{name: np.zeros((n, cw), np.int64) for name in ("x0", "x1")},
            **{name: np.zeros((n, cw), np.int32) for name in ("a0", "a1")},
            **{name: np.zeros((n, ch), np.int64) for name in ("y0", "y1")},
            **{name: np.zeros((n, ch), np.int32) for name in ("b0", "b1")},
        }
        for slot, (k, plan) in enumerate(zip(frames, plans, strict=True)):
            if not plan.empty:
                self._fill(host, slot, k, plan)
        self._tables = {name: torch.from_numpy(a).to(self.device) for name, a in host.items()}
        self._slots[:] = -1
        self._slots[frames] = np.arange(n)

    def _fill(self, host: dict[str, np.ndarray], slot: int, k: int, plan: Plan) -> None:
        """Canvas row/column → frame row/column (edge rows and the encoder's padding repeat real ones),
        then per canvas pixel: the frame's pixel, the mask, and the face's resize taps."""
        face, frame, mask = self.template.faces[k], self.template.frames[k], self.template.masks[k]
        (width, height), (bx1, by1, bx2, by2) = self.size, plan.block
        rx1, ry1, rx2, ry2 = plan.region
        x1, y1, x2, y2 = face.face_box
        cx1, cy1 = face.crop_box[:2]
        rows = np.clip(np.arange(by1 - 1, by2 + 1), 0, height - 1)
        cols = np.minimum(np.arange(bx1, bx2), width - 1)
        inside_y, inside_x = (rows >= ry1) & (rows < ry2), (cols >= rx1) & (cols < rx2)
        h, w = len(rows), len(cols)
        host["background"][slot, :h, :w] = frame[rows][:, cols]
        under = mask[np.clip(rows - cy1, 0, mask.shape[0] - 1)][:, np.clip(cols - cx1, 0, mask.shape[1] - 1)]
        host["mask"][slot, :h, :w] = np.where(inside_y[:, None] & inside_x[None, :], under, 0)
        for names, src_taps, offsets, inside, n in (
            (("x0", "x1", "a0", "a1"), linear_taps(256, x2 - x1, clamp=True), cols - x1, inside_x, w),
            (("y0", "y1", "b0", "b1"), linear_taps(256, y2 - y1, clamp=False), rows - y1, inside_y, h),
        ):
            at = np.clip(offsets, 0, len(src_taps[0]) - 1)
            for name, taps in zip(names, src_taps, strict=True):
                host[name][slot, :n] = np.where(inside, taps[at], 0)

    def composite(self, faces: torch.Tensor, ks: Sequence[int]) -> Composited:
        """Blend ``faces`` (uint8 [n, 256, 256, 3] on the device) into ``load``-ed template frames ``ks``."""
        if faces.shape[1:] != (256, 256, 3) or len(ks) != len(faces):
            raise ValueError(
                f"composite wants uint8 [n,256,256,3] faces and n frame indices, got {faces.shape}"
            )
        slots = self._slots[np.asarray(ks, dtype=np.int64)]
        if (slots < 0).any():
            missing = sorted(set(np.asarray(ks)[slots < 0].tolist()))
            raise ValueError(f"template frames {missing} were not loaded")
        plans = [self.plan(int(k)) for k in ks]
        t = self._tables
        if not t or t["background"].shape[2] == 0:
            return Composited(None, plans)
        index = to_device(torch.from_numpy(slots), self.device)

        def pick(*names: str) -> tuple[torch.Tensor, ...]:
            return tuple(t[name].index_select(0, index) for name in names)

        resized = _resize(faces.to(torch.int32), pick("x0", "x1", "a0", "a1"), pick("y0", "y1", "b0", "b1"))
        background, mask = pick("background", "mask")
        return Composited(pil_blend_(background, resized, mask), plans)

    def background(self, k: int) -> np.ndarray:
        """Template frame ``k`` as the encoder takes it: padded to the coded size, converted to packed
        YUV 4:2:0 (``[H·3/2, W]``, see ``yuv.py``) on the device, on the host."""
        frame = self.template.frames[k]
        (width, height), (coded_w, coded_h) = self.size, self.coded_size
        frame = np.pad(frame, ((0, coded_h - height), (0, coded_w - width), (0, 0)), mode="edge")
        planes = rgb_to_yuv420(torch.from_numpy(frame).to(self.device))
        return i420(*(p.cpu().numpy() for p in planes))

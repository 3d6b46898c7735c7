"""What a composited frame changes in its template frame (``Patch``), copied to the host in one pinned
transfer so that the encoder threads never wait on the model thread."""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from musetalk_ops.device_paste import Composited
from musetalk_ops.yuv import rgb_to_yuv420


@dataclass(frozen=True)
class Patch:
    """What a composited frame changes in its template frame, in host memory: the YUV planes of
    ``block`` (None: nothing) and, for ``frames_dir``, the RGB pixels of ``region``; readable once
    ``ready`` (a CUDA event; None on the CPU) has passed."""

    block: tuple[int, int, int, int]
    planes: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    region: tuple[int, int, int, int]
    rgb: np.ndarray | None
    ready: "torch.cuda.Event | None"


def host_patches(composited: Composited, with_rgb: bool) -> list[Patch]:
    """YUV 4:2:0 of each face's blended block (and its RGB region when PNGs are wanted), copied to the
    host in one transfer; one ``Patch`` per face, in the order given to ``composite``."""
    canvas, plans = composited.canvas, composited.plans
    if canvas is None:
        return [Patch(p.block, None, p.region, None, None) for p in plans]
    tensors = [*rgb_to_yuv420(canvas, context=True), *([canvas] if with_rgb else [])]
    host, ready = to_host(tensors)
    offsets = itertools.accumulate((t.numel() for t in tensors), initial=0)
    y, u, v, *rgb = (host[o : o + t.numel()].reshape(t.shape) for t, o in zip(tensors, offsets, strict=False))
    out = []
    for j, plan in enumerate(plans):
        (bx1, by1, bx2, by2), (x1, y1, x2, y2) = plan.block, plan.region
        height, width = by2 - by1, bx2 - bx1
        planes = (
            None
            if plan.empty
            else (y[j, :height, :width], u[j, : height // 2, : width // 2], v[j, : height // 2, : width // 2])
        )
        region = None
        if rgb and not plan.empty:
            region = rgb[0][j, 1 + y1 - by1 : 1 + y2 - by1, x1 - bx1 : x2 - bx1]
        out.append(Patch(plan.block, planes, plan.region, region, ready))
    return out


def to_host(tensors: list[torch.Tensor]) -> tuple[np.ndarray, torch.cuda.Event | None]:
    """All tensors (uint8), flattened into one host buffer (pinned on CUDA, copied asynchronously), and
    the event that marks the copy done (None on the CPU)."""
    if not tensors:
        return np.zeros(0, dtype=np.uint8), None
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if flat.device.type != "cuda":
        return flat.numpy(), None
    host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    ready = torch.cuda.Event(blocking=True)  # encoder threads sleep on it instead of spinning a core
    ready.record()
    return host.numpy(), ready

"""RGB → YUV 4:2:0 (BT.709, limited range) in torch, on the device that holds the frames.

x264 encodes YUV 4:2:0. Converting where the faces are composited (the GPU on the fast path) takes
swscale's RGB → YUV off the encoder threads (the largest share of encoding after x264 itself) and
halves the bytes copied back to the host.

The arithmetic follows swscale's ``rgb24 → yuv420p`` (bilinear, accurate rounding), the path the
reference render takes, in float32: the studio-swing BT.709 matrix on 8-bit RGB (Y 16–235, Cb/Cr
16–240); each chroma sample averages a horizontal pair of pixels and filters rows with the taps
(1, 3, 3, 1)/8 around its row pair, the frame's edge rows repeated beyond its borders; rounded half up.
It differs from swscale's fixed-point result by at most one level (tests/engine/test_yuv.py), so converted
face regions sit in swscale-converted surroundings without a seam.

A region converted on its own needs the rows just above and below it for its chroma: callers pass
them as ``context`` rows (the frame's edge rows again where the region touches a border).
"""

from functools import lru_cache

import numpy as np
import torch

KR, KB = 0.2126, 0.0722  # BT.709 luma weights of red and blue
KG = 1 - KR - KB
_Y = (219 / 255) * torch.tensor([KR, KG, KB])
_CB = (224 / 255) * torch.tensor([-KR, -KG, 1 - KB]) / (2 * (1 - KB))
_CR = (224 / 255) * torch.tensor([1 - KR, -KG, -KB]) / (2 * (1 - KR))


@lru_cache(maxsize=8)
def _weights(device: torch.device) -> torch.Tensor:
    """[3 (R, G, B), 3 (Y, Cb, Cr)] on ``device``, uploaded once: an upload from pageable memory makes
    the host wait for all queued GPU work, which per batch would stall the fast path."""
    return torch.stack([_Y, _CB, _CR], dim=1).to(device)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return x.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def rgb_to_yuv420(rgb: torch.Tensor, *, context: bool = False) -> tuple[torch.Tensor, ...]:
    """uint8 RGB ``[..., H, W, 3]`` with even H and W → uint8 planes Y ``[..., H, W]``, U and V
    ``[..., H/2, W/2]`` on ``rgb``'s device. With ``context`` the first and last rows of ``rgb`` are
    only the vertical chroma filter's neighbours (H counts the rows between them)."""
    rows, width = rgb.shape[-3:-1]
    height = rows - 2 if context else rows
    if rgb.dtype != torch.uint8 or rgb.shape[-1] != 3 or height < 2 or height % 2 or width % 2:
        raise ValueError(
            f"rgb_to_yuv420 wants uint8 [..., even H{' + 2' if context else ''}, even W, 3], "
            f"got {rgb.dtype} {list(rgb.shape)}"
        )
    x = rgb.to(torch.float32)
    if not context:  # a whole frame: its edge rows stand in for the missing neighbours
        x = torch.cat([x[..., :1, :, :], x, x[..., -1:, :, :]], dim=-3)
    weights = _weights(x.device)
    y = _quantise(x[..., 1:-1, :, :] @ weights[:, 0] + 16)
    c = (x @ weights[:, 1:]).unflatten(-2, (width // 2, 2)).mean(dim=-2)  # [..., H + 2, W/2, 2]
    c = (c[..., 0:height:2, :, :] + c[..., 3 : height + 2 : 2, :, :]) + 3 * (
        c[..., 1 : height + 1 : 2, :, :] + c[..., 2 : height + 2 : 2, :, :]
    )
    chroma = _quantise(c / 8 + 128)
    return y, chroma[..., 0], chroma[..., 1]


def i420(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One frame's planes packed as PyAV's ``yuv420p`` ndarray: ``[H·3/2, W]``, Y then U then V."""
    height, width = y.shape
    return np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(height * 3 // 2, width)


def i420_planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writable views of the Y, U and V planes of a packed ``[H·3/2, W]`` frame."""
    width = frame.shape[1]
    height = frame.shape[0] * 2 // 3
    flat = frame.reshape(-1)
    luma, quarter = height * width, height * width // 4
    return (
        flat[:luma].reshape(height, width),
        flat[luma : luma + quarter].reshape(height // 2, width // 2),
        flat[luma + quarter :].reshape(height // 2, width // 2),
    )

"""RGB → YUV 4:2:0 in torch (the fast path's conversion) against swscale (the reference path's), and
YUV frames handed to the encoder unchanged."""

import av
import numpy as np
import pytest
import torch
from av.video.frame import VideoFrame
from av.video.reformatter import Interpolation

from musetalk_ops.video import SegmentWriter
from musetalk_ops.yuv import i420, i420_planes, rgb_to_yuv420


def _swscale(rgb: np.ndarray) -> np.ndarray:
    """What ``SegmentWriter.write`` gives x264 for an RGB frame."""
    return (
        VideoFrame.from_ndarray(rgb, format="rgb24")
        .reformat(
            format="yuv420p",
            dst_colorspace="itu709",
            dst_color_range="MPEG",
            interpolation=Interpolation.BILINEAR | Interpolation.ACCURATE_RND,
        )
        .to_ndarray()
    )


def _ours(rgb: np.ndarray) -> np.ndarray:
    return i420(*(p.numpy() for p in rgb_to_yuv420(torch.from_numpy(rgb))))


@pytest.mark.parametrize(
    ("height", "width"), [(8, 2), (16, 16), (30, 64), (64, 30), (240, 320), (1080, 1920)]
)
def test_within_one_level_of_swscale(height, width, astronaut_rgb):
    rng = np.random.default_rng(height * width)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    photo = np.resize(astronaut_rgb, (height, width, 3))  # natural image content, tiled
    for rgb in (noise, photo):
        diff = np.abs(_ours(rgb).astype(int) - _swscale(rgb).astype(int))
        assert diff.max() <= 1
        assert (diff[:height] > 0).mean() < 0.02 and (diff[height:] > 0).mean() < 0.01  # Y, then U and V


def test_extremes_and_flat_colours_are_exact():
    colours = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 30, 90)]
    for colour in colours:
        rgb = np.full((8, 8, 3), colour, dtype=np.uint8)
        np.testing.assert_array_equal(_ours(rgb), _swscale(rgb), err_msg=str(colour))
    y, u, v = rgb_to_yuv420(torch.tensor([[[0, 0, 0], [255, 255, 255]]] * 2, dtype=torch.uint8))
    assert y.tolist() == [[16, 235]] * 2 and u.tolist() == v.tolist() == [[128]]


def test_a_region_with_context_rows_converts_like_the_whole_frame():
    """The fast path converts only the block that changed: with one context row above and below (edge
    rows repeated at the borders) its planes equal the whole frame's planes there."""
    rgb = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    y, u, v = (p.numpy() for p in rgb_to_yuv420(torch.from_numpy(rgb)))
    for top, bottom in [(0, 40), (0, 8), (12, 20), (32, 40)]:
        rows = np.clip(np.arange(top - 1, bottom + 1), 0, 39)
        block = torch.from_numpy(rgb[rows][:, 6:18])
        by, bu, bv = (p.numpy() for p in rgb_to_yuv420(block, context=True))
        np.testing.assert_array_equal(by, y[top:bottom, 6:18])
        np.testing.assert_array_equal(bu, u[top // 2 : bottom // 2, 3:9])
        np.testing.assert_array_equal(bv, v[top // 2 : bottom // 2, 3:9])
    batch = torch.from_numpy(np.stack([rgb, rgb[::-1].copy()]))
    assert [p.shape for p in rgb_to_yuv420(batch)] == [(2, 40, 24), (2, 20, 12), (2, 20, 12)]


@pytest.mark.parametrize("shape", [(7, 8, 3), (8, 7, 3), (8, 8, 4), (0, 8, 3)])
def test_refuses_odd_or_wrong_shapes(shape):
    with pytest.raises(ValueError, match="rgb_to_yuv420 wants uint8"):
        rgb_to_yuv420(torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rgb_to_yuv420 wants uint8"):
        rgb_to_yuv420(torch.zeros((8, 8, 3), dtype=torch.float32))


def test_i420_planes_are_views_of_the_packed_frame():
    frame = np.zeros((12, 6), dtype=np.uint8)
    y, u, v = i420_planes(frame)
    assert (y.shape, u.shape, v.shape) == ((8, 6), (4, 3), (4, 3))
    y[:], u[:], v[:] = 1, 2, 3
    assert (frame[:8] == 1).all() and (frame[8:10] == 2).all() and (frame[10:] == 3).all()
    np.testing.assert_array_equal(i420(y, u, v), frame)


def test_write_yuv_hands_the_planes_to_x264_unchanged(tmp_path):
    """crf 0 is lossless for 8-bit x264: the decoded planes are exactly the planes written."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(16, 236, (48, 32), dtype=np.uint8) for _ in range(3)]
    with SegmentWriter(tmp_path / "s.mp4", 25, 32, 32, crf=0) as writer:
        for frame in frames:
            writer.write_yuv(frame)
        with pytest.raises(ValueError, match=r"expected uint8 \[48,32\] packed YUV 4:2:0"):
            writer.write_yuv(frames[0][:-1])
    with av.open(str(tmp_path / "s.mp4")) as container:
        decoded = [f.to_ndarray() for f in container.decode(video=0)]
    assert len(decoded) == 3
    for got, want in zip(decoded, frames, strict=True):
        np.testing.assert_array_equal(got, want)

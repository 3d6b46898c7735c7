"""Paste-back parity: our numpy compositing against Pillow itself and an official-style PIL path."""

import cv2
import numpy as np
import pytest
from helpers import every_blend_triple
from PIL import Image

from musetalk_ops.blend import crop_box_for, frame_indices, paste_face, pil_blend


def official_get_image_blending(frame, face256, face_box, mask, crop_box):
    """The official realtime path, written independently with PIL (docs/reference.md §2.10, §3.3)."""
    x, y, x1, y1 = face_box
    x_s, y_s = crop_box[0], crop_box[1]
    face = cv2.resize(face256, (x1 - x, y1 - y))  # OpenCV default: INTER_LINEAR
    body = Image.fromarray(frame)
    face_large = body.crop(tuple(crop_box))
    face_large.paste(Image.fromarray(face), (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, (x_s, y_s), Image.fromarray(mask).convert("L"))
    return np.array(body)


def test_pil_blend_equals_pillow_paste_for_every_value_triple():
    dst, src, mask, expected = every_blend_triple()
    np.testing.assert_array_equal(pil_blend(dst, src, mask), expected)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (255, 256)])
def test_pil_blend_random_sizes(shape):
    rng = np.random.default_rng(shape[0])
    dst = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    src = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, shape, dtype=np.uint8)
    expected = Image.fromarray(dst)
    expected.paste(Image.fromarray(src), (0, 0), Image.fromarray(mask, "L"))
    np.testing.assert_array_equal(pil_blend(dst, src, mask), np.array(expected))


def test_blending_a_pixel_with_itself_is_the_identity():
    v, m = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    np.testing.assert_array_equal(pil_blend(v, v, m), v)


def test_crop_box_for_reference_example():
    assert crop_box_for((100, 120, 300, 330)) == (43, 68, 357, 382)
    # w=101 → s = int(50 * 1.5) = 75; centre (50, 25) floored.
    assert crop_box_for((0, 0, 101, 50)) == (-25, -50, 125, 100)
    assert crop_box_for((10, 10, 30, 50), expand=1.2) == (-4, 6, 44, 54)  # s = int(20 * 1.2) = 24


def _case(rng, height, width, face_box, crop_box=None):
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    crop_box = crop_box or crop_box_for(face_box)
    mask = rng.integers(0, 256, (crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]), dtype=np.uint8)
    mask[: mask.shape[0] // 4] = 0
    mask[-3:] = 255
    return frame, face, face_box, mask, crop_box


CASES = {
    "inside": (120, 160, (50, 30, 110, 100), None),
    "crop past top-left": (120, 160, (2, 1, 60, 70), None),
    "face past right and bottom": (120, 160, (120, 80, 175, 140), None),
    "crop larger than frame": (40, 50, (5, 5, 45, 38), None),
    "face sticks out of its crop box": (120, 160, (40, 40, 100, 90), (60, 50, 90, 80)),
    "crop box off-frame": (60, 60, (10, 10, 30, 30), (70, 70, 90, 90)),
}


@pytest.mark.parametrize("name", CASES)
def test_paste_face_matches_official_pil_path(name):
    height, width, box, crop = CASES[name]
    args = _case(np.random.default_rng(len(name)), height, width, box, crop)
    frame = args[0].copy()
    out = paste_face(*args)
    np.testing.assert_array_equal(out, official_get_image_blending(*args))
    np.testing.assert_array_equal(args[0], frame)  # the input frame is left alone


def test_paste_face_random_boxes_match_official():
    rng = np.random.default_rng(7)
    for _ in range(40):
        height, width = rng.integers(40, 140, 2)
        x1, y1 = rng.integers(-10, width - 5), rng.integers(-5, height - 5)
        x2, y2 = x1 + rng.integers(2, 90), y1 + rng.integers(2, 90)
        box = (int(max(x1, 0)), int(max(y1, 0)), int(x2), int(y2))
        args = _case(rng, height, width, box)
        np.testing.assert_array_equal(paste_face(*args), official_get_image_blending(*args))


def test_only_the_face_box_inside_the_frame_changes():
    rng = np.random.default_rng(3)
    frame, face, box, mask, crop = _case(rng, 100, 120, (80, 50, 140, 130))
    mask[:] = 255
    changed = np.any(paste_face(frame, face, box, mask, crop) != frame, axis=2)
    allowed = np.zeros_like(changed)
    allowed[50:100, 80:120] = True
    assert changed.any()
    assert not (changed & ~allowed).any()


def test_paste_face_rejects_inconsistent_inputs():
    frame = np.zeros((50, 50, 3), np.uint8)
    face = np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(ValueError, match="mask"):
        paste_face(frame, face, (10, 10, 20, 20), np.zeros((5, 5), np.uint8), (0, 0, 30, 30))
    with pytest.raises(ValueError, match="empty face box"):
        paste_face(frame, face, (10, 10, 10, 20), np.zeros((30, 30), np.uint8), (0, 0, 30, 30))


@pytest.mark.parametrize(("start", "stop", "n"), [(0, 20, 3), (5, 17, 4), (0, 7, 1), (1000, 1010, 6)])
def test_frame_indices_follow_the_official_cycles(start, stop, n):
    cycle = list(range(n)) + list(range(n))[::-1]  # official frames + frames[::-1]
    expected_pingpong = [cycle[i % len(cycle)] for i in range(start, stop)]
    assert frame_indices(start, stop, n, "pingpong").tolist() == expected_pingpong
    assert frame_indices(start, stop, n, "none").tolist() == [i % n for i in range(start, stop)]


def test_frame_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cycle"):
        frame_indices(0, 3, 2, "loop")
    with pytest.raises(ValueError, match="at least one frame"):
        frame_indices(0, 3, 0, "none")

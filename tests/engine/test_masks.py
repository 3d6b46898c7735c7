"""Parsing modes and blending masks (docs/reference.md §2.9–2.10) against hand-derived expectations."""

import cv2
import numpy as np
import pytest
from PIL import Image

from musetalk_ops.masks import (
    K_CONE,
    blending_mask,
    blur_kernel_size,
    cheek_mask,
    landmark_mask,
    parse_mask,
)

SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK, HAIR = 1, 10, 11, 12, 13, 14, 17


def labels_with(*blocks: tuple[int, slice, slice]) -> np.ndarray:
    labels = np.zeros((512, 512), np.uint8)
    for label, rows, cols in blocks:
        labels[rows, cols] = label
    return labels


def test_cone_kernel_rows():
    assert K_CONE.shape == (33, 33) and K_CONE.dtype == np.uint8
    assert int(K_CONE.sum()) == 373
    widths = [0] * 10 + list(range(1, 22, 2)) + [21] * 12
    assert K_CONE.sum(axis=1).tolist() == widths
    for row, width in enumerate(widths):
        ones = np.flatnonzero(K_CONE[row])
        if width:  # one centred run
            assert ones.tolist() == list(range(16 - width // 2, 16 + width // 2 + 1))
    assert K_CONE[21:, 6:27].all() and not K_CONE[21:, :6].any()


def test_cone_dilation_grows_16_up_and_6_down():
    # OpenCV dilation paints the kernel flipped about its centre around every source pixel.
    src = np.zeros((100, 100), np.uint8)
    src[50, 50] = 255
    grown = cv2.dilate(src, K_CONE)
    expected = np.zeros_like(src)
    expected[50 - 16 : 50 + 17, 50 - 16 : 50 + 17] = K_CONE[::-1, ::-1] * 255
    np.testing.assert_array_equal(grown, expected)
    rows = np.flatnonzero(grown.any(axis=1))
    assert rows.min() == 34 and rows.max() == 56  # 16 px up, 6 px down


def test_cheek_mask_inclusive_corners():
    cheeks = cheek_mask(90, 90)
    assert (cheeks[:, :167] == 255).all() and (cheeks[:, 346:] == 255).all()
    assert (cheeks[:, 167:346] == 0).all()
    cheeks = cheek_mask(80, 100)
    assert cheeks[0, 176] == 255 and cheeks[0, 177] == 0 and cheeks[511, 355] == 0 and cheeks[511, 356] == 255


def test_raw_mode_labels():
    labels = np.arange(512 * 512, dtype=np.int64).reshape(512, 512) % 19
    out = parse_mask(labels.astype(np.uint8), "raw")
    expected = np.isin(labels, [1, 11, 12, 13]) * 255
    np.testing.assert_array_equal(out, expected)


def test_jaw_mode_grows_skin_in_centre_band():
    # Skin block inside the centre band (cols 167–345): dilation only, no cheek erosion.
    out = parse_mask(labels_with((SKIN, slice(300, 401), slice(200, 301))), "jaw")
    assert out[284, 190] == 255 and out[284, 310] == 255  # 16 px up, ±10 px wider
    assert out[283, 250] == 0 and out[284, 189] == 0 and out[284, 311] == 0
    assert out[406, 250] == 255 and out[407, 250] == 0  # 6 px down at the cone's tip
    assert out[406, 199] == 0 and out[401, 195] == 255 and out[401, 194] == 0  # taper
    assert set(np.unique(out)) == {0, 255}


def test_jaw_mode_pulls_in_cheeks():
    out = parse_mask(labels_with((SKIN, slice(200, 401), slice(50, 461))), "jaw")
    # Left edge: dilated to col 40, eroded twice by the 35-wide ellipse (17 px each) → 74.
    assert out[300, 74] == 255 and out[300, 73] == 0
    assert out[300, 436] == 255 and out[300, 437] == 0  # right: 470 − 34
    # Vertically the 3-high ellipse takes 1 px per erosion in the cheeks only.
    assert out[185, 256] == 255 and out[184, 256] == 255 and out[183, 256] == 0
    assert out[185, 120] == 0 and out[186, 120] == 255
    assert out[404, 120] == 255 and out[405, 120] == 0 and out[406, 256] == 255


def test_jaw_mode_excludes_nose_and_includes_lips():
    labels = labels_with(
        (SKIN, slice(100, 450), slice(170, 340)),
        (NOSE, slice(200, 260), slice(230, 280)),
        (UPPER_LIP, slice(20, 30), slice(5, 40)),  # far from skin, in a cheek zone
        (MOUTH, slice(470, 480), slice(250, 260)),
        (LOWER_LIP, slice(490, 500), slice(480, 500)),
        (HAIR, slice(0, 10), slice(200, 300)),
        (NECK, slice(500, 512), slice(0, 100)),
    )
    out = parse_mask(labels, "jaw")
    assert (out[200:260, 230:280] == 0).all()  # nose cut out although surrounded by grown skin
    assert (out[20:30, 5:40] == 255).all() and (out[470:480, 250:260] == 255).all()
    assert (out[490:500, 480:500] == 255).all()
    assert (out[0:10, 200:300] == 0).all() and (out[505:, :100] == 0).all()
    assert out[199, 250] == 255 and out[260, 250] == 255  # skin around the nose stays


@pytest.mark.parametrize(("width", "k"), [(200, 21), (256, 25), (300, 31), (400, 41), (512, 51)])
def test_blur_kernel_sizes(width, k):
    assert blur_kernel_size(width) == k


def test_blending_mask_keeps_lower_face_box_only():
    face_box, crop_box = (100, 120, 300, 330), (43, 68, 357, 382)  # docs/reference.md §2.10 example, s = 157
    mask = blending_mask(np.full((512, 512), 255, np.uint8), face_box, crop_box)
    assert mask.shape == (314, 314) and mask.dtype == np.uint8
    # Before blurring: 255 on rows [157, 330−68) × cols [100−43, 300−43), else 0; k = 31 (W = 314).
    expected = np.zeros((314, 314), np.uint8)
    expected[157:262, 57:257] = 255
    np.testing.assert_array_equal(mask, cv2.GaussianBlur(expected, (31, 31), 0))
    assert (mask[: 157 - 15] == 0).all()  # upper half cleared (beyond the blur radius)
    assert (mask[:, : 57 - 15] == 0).all() and (mask[:, 257 + 15 :] == 0).all()
    assert mask[210, 157] == 255


def test_blending_mask_resizes_bicubic():
    seg = np.zeros((512, 512), np.uint8)
    cv2.circle(seg, (256, 300), 150, 255, cv2.FILLED)
    face_box, crop_box = (30, 20, 170, 190), (0, 5, 200, 205)

    def reference(resample):
        resized = np.asarray(Image.fromarray(seg).resize((200, 200), resample))
        kept = np.zeros((200, 200), np.uint8)
        kept[15:185, 30:170] = resized[15:185, 30:170]  # face box in crop coordinates
        kept[:100] = 0
        return cv2.GaussianBlur(kept, (21, 21), 0)

    mask = blending_mask(seg, face_box, crop_box)
    np.testing.assert_array_equal(mask, reference(Image.Resampling.BICUBIC))
    assert not np.array_equal(mask, reference(Image.Resampling.BILINEAR))


def synthetic_face() -> np.ndarray:
    """68 points: jaw U from (100,100) via the chin (200,300) to (300,100), nose bottom at y 180."""
    lm = np.zeros((68, 2), np.int32)
    angles = np.linspace(np.pi, 0, 17)
    lm[:17, 0] = 200 + 100 * np.cos(angles)
    lm[:17, 1] = 100 + 200 * np.sin(angles)
    lm[31:36] = [(180, 180), (190, 182), (200, 184), (210, 182), (220, 180)]
    lm[29] = (200, 150)
    return lm


def test_landmark_mask_lower_face_polygon():
    lm = synthetic_face()
    face_box, crop_box = (100, 0, 300, 310), (50, 5, 350, 305)  # crop centre row 155 (crop row 150)
    mask = landmark_mask(lm, face_box, crop_box)
    assert mask.shape == (300, 300)
    assert (mask[: 150 - 15] == 0).all()  # rows above the centre line, beyond the 31-px blur
    assert mask[250 - 5, 200 - 50] == 255  # between the nose and the chin
    assert mask[280 - 5, 110 - 50] == 0  # inside the face box but 45 px left of the jaw contour
    assert mask[299, 60] == 0  # below-left of the chin, outside the polygon

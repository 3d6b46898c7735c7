"""Landmarks and the official face-box rule (docs/reference.md §2.4–2.5), against hand-computed boxes."""

import numpy as np
import pytest

from musetalk_ops.config import Limits
from musetalk_ops.errors import InputError
from musetalk_ops.faces import (
    DlibDetector,
    apply_extra_margin,
    format_indices,
    landmark_box,
    largest_face,
    track_faces,
)
from musetalk_ops.settings import TemplateSettings


def synthetic_lm(x_min: int, x_max: int, nose_y: int, chin_y: int, top_y: int | None = None) -> np.ndarray:
    """68 points spread from (x_min, top_y) to (x_max, chin_y), point 29 at nose_y, chin the lowest."""
    lm = np.zeros((68, 2), np.int32)
    lm[:, 0] = np.linspace(x_min, x_max, 68).round()
    lm[:, 1] = np.linspace(top_y if top_y is not None else nose_y - 30, chin_y, 68).round()
    lm[29, 1] = nose_y
    return lm


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


def test_dlib_landmarks_on_astronaut(detector, astronaut_rgb):
    faces = detector.detect(astronaut_rgb)
    assert len(faces) == 1  # upsample 0: the mission patch is not a face
    lm = faces[0]
    assert lm.shape == (68, 2)
    # Known face region x 177–272, y 66–175 (hand-measured, approximate: the chin reaches ≈178).
    assert (lm[:, 0] >= 177 - 3).all() and (lm[:, 0] <= 272 + 3).all()
    assert (lm[:, 1] >= 66 - 3).all() and (lm[:, 1] <= 175 + 4).all()
    # iBUG-68 layout (= DWPose face keypoints): eyes above nose tip above mouth above chin,
    # the subject's right eye (36–41) on the image's left.
    eyes_y, nose_tip_y, mouth_y, chin_y = lm[36:48, 1].mean(), lm[30, 1], lm[48:68, 1].mean(), lm[8, 1]
    assert eyes_y < nose_tip_y < mouth_y < chin_y
    assert lm[36:42, 0].mean() < lm[42:48, 0].mean()
    assert lm[0, 0] < lm[8, 0] < lm[16, 0]  # jaw contour runs left → chin → right


def test_dlib_large_frame_searched_downscaled(detector, astronaut_rgb):
    import cv2

    frame = np.full((1080, 1920, 3), 90, np.uint8)
    frame[30:1054, 400:1424] = cv2.resize(astronaut_rgb, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    faces = detector.detect(frame)
    assert len(faces) == 1  # the mission patch (a weak detection at this size) is dropped
    lm = faces[0]
    # Face region scaled 2× and moved by (400, 30): x 754–944, y 162–380 (chin ≈ 386).
    assert (lm[:, 0] >= 754 - 6).all() and (lm[:, 0] <= 944 + 6).all()
    assert (lm[:, 1] >= 162 - 6).all() and (lm[:, 1] <= 380 + 8).all()


def test_no_face_on_flat_grey(detector):
    assert detector.detect(np.full((200, 200, 3), 128, np.uint8)) == []


def test_landmark_box_shift_zero():
    lm = synthetic_lm(100, 200, nose_y=120, chin_y=200)
    # d = 200 − 120 = 80 → y1 = 120 − 80 = 40; nose point is the vertical centre.
    assert landmark_box(lm) == (100, 40, 200, 200)


@pytest.mark.parametrize(("shift", "expected_y1"), [(7, 127 - 73), (-5, 115 - 85)])
def test_landmark_box_shift_moves_top_by_twice_the_shift(shift, expected_y1):
    lm = synthetic_lm(100, 200, nose_y=120, chin_y=200)
    box = landmark_box(lm, shift)
    assert box == (100, expected_y1, 200, 200)
    assert box[1] == 40 + 2 * shift
    assert lm[29, 1] == 120  # the caller's landmarks are not mutated


def test_shifted_nose_point_takes_part_in_the_maximum():
    # Official code shifts point 29 in place before max(y): shifted below the chin it becomes the bottom,
    # d = 0 and the box is empty → invalid → fallback.
    lm = synthetic_lm(100, 200, nose_y=190, chin_y=200)
    assert landmark_box(lm, 20) is None
    assert landmark_box(lm, 20, fallback=(1, 2, 3, 4)) == (1, 2, 3, 4)
    # Shifted to exactly the chin level: still empty.
    assert landmark_box(lm, 10) is None
    # Shifted 5 px: centre 195, bottom 200 → top 190.
    assert landmark_box(lm, 5) == (100, 190, 200, 200)


def test_landmark_box_top_clamped_at_zero():
    lm = synthetic_lm(30, 90, nose_y=50, chin_y=200, top_y=10)
    assert landmark_box(lm) == (30, 0, 90, 200)  # 50 − 150 < 0 → 0


def test_landmark_box_invalid_when_left_of_frame():
    lm = synthetic_lm(-3, 90, nose_y=100, chin_y=150)
    assert landmark_box(lm) is None
    assert landmark_box(lm, fallback=(0, 50, 90, 150)) == (0, 50, 90, 150)


def test_landmark_box_truncates_like_astype_int32():
    lm = synthetic_lm(100, 200, nose_y=120, chin_y=200).astype(np.float64)
    lm[0, 0] = -0.7  # truncation towards zero → 0: valid (floor would give −1: invalid)
    lm[29, 1] = 120.9  # → 120
    lm[67, 1] = 200.99  # → 200
    assert landmark_box(lm) == (0, 40, 200, 200)


def test_extra_margin_clamped_to_height():
    assert apply_extra_margin((10, 20, 100, 200), 10, 300) == (10, 20, 100, 210)
    assert apply_extra_margin((10, 20, 100, 200), 10, 205) == (10, 20, 100, 205)
    assert apply_extra_margin((10, 20, 100, 200), 0, 200) == (10, 20, 100, 200)


def test_largest_face_by_landmark_span():
    small = synthetic_lm(0, 80, nose_y=60, chin_y=100)
    big = synthetic_lm(200, 320, nose_y=100, chin_y=170)
    assert largest_face([small, big]) == 1
    assert largest_face([big, small]) == 0


def test_format_indices():
    assert format_indices([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert format_indices([3]) == "3"


class ScriptedDetector:
    """Returns the faces scripted for frame i, where i is stored in the frame's first pixel."""

    def __init__(self, script: dict[int, list[np.ndarray]]):
        self.script = script
        self.calls = 0

    def detect(self, frame):
        self.calls += 1
        return self.script.get(int(frame[0, 0, 0]), [])


def indexed_frames(n: int, height: int = 300, width: int = 400) -> np.ndarray:
    frames = np.zeros((n, height, width, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(n)
    return frames


def test_track_faces_per_frame_with_margin_and_largest_face():
    face = synthetic_lm(100, 200, nose_y=120, chin_y=200)
    other = synthetic_lm(300, 330, nose_y=50, chin_y=70)
    det = ScriptedDetector({0: [face], 1: [other, face], 2: [face]})
    track = track_faces(indexed_frames(3), TemplateSettings(), detector=det)
    assert det.calls == 3
    assert track.boxes == [(100, 40, 200, 210)] * 3  # extra_margin 10
    assert track.landmarks[1] is face
    assert any("several faces in frame(s) 1" in w for w in track.warnings)


def test_track_faces_v1_applies_shift_and_no_margin():
    face = synthetic_lm(100, 200, nose_y=120, chin_y=200)
    track = track_faces(
        indexed_frames(1),
        TemplateSettings(version="v1", bbox_shift=5),
        detector=ScriptedDetector({0: [face]}),
    )
    assert track.boxes == [(100, 50, 200, 200)]


def test_track_faces_missing_frames_are_listed():
    face = synthetic_lm(100, 200, nose_y=120, chin_y=200)
    det = ScriptedDetector({0: [face], 3: [face]})
    with pytest.raises(InputError, match=r"clip\.mp4: no face found in frame\(s\) 1-2, 4 of 5") as e:
        track_faces(indexed_frames(5), TemplateSettings(), detector=det, name="clip.mp4")
    assert "\n" not in str(e.value)


def test_track_faces_passthrough_keeps_frames_without_face():
    face = synthetic_lm(100, 200, nose_y=120, chin_y=200)
    det = ScriptedDetector({0: [face], 3: [face]})
    track = track_faces(indexed_frames(4), TemplateSettings(no_face="passthrough"), detector=det)
    assert track.boxes[1] is None and track.boxes[2] is None
    assert track.boxes[0] == track.boxes[3] == (100, 40, 200, 210)
    assert any("1-2" in w for w in track.warnings)


def test_track_faces_no_face_anywhere_is_an_error_even_with_passthrough():
    with pytest.raises(InputError, match="no face found"):
        track_faces(indexed_frames(2), TemplateSettings(no_face="passthrough"), detector=ScriptedDetector({}))


def test_track_faces_refuses_small_faces():
    face = synthetic_lm(100, 150, nose_y=120, chin_y=200)  # 50 px wide < 64
    with pytest.raises(InputError, match="smaller than 64 px"):
        track_faces(indexed_frames(1), TemplateSettings(), detector=ScriptedDetector({0: [face]}))
    track = track_faces(
        indexed_frames(1),
        TemplateSettings(),
        detector=ScriptedDetector({0: [face]}),
        limits=Limits(min_face_pixels=40),
    )
    assert track.boxes == [(100, 40, 150, 210)]


class FailingDetector:
    def detect(self, frame):
        raise AssertionError("detection must be skipped with a manual face box")


def test_manual_face_box_skips_detection():
    settings = TemplateSettings(face_box=(120, 60, 260, 250))
    track = track_faces(indexed_frames(3), settings, detector=FailingDetector())
    assert track.boxes == [(120, 60, 260, 260)] * 3
    assert track.landmarks == [None] * 3


def test_manual_face_box_outside_frame():
    with pytest.raises(InputError, match="outside the 400x300 frame"):
        settings = TemplateSettings(face_box=(10, 10, 410, 200))
        track_faces(indexed_frames(1), settings, detector=FailingDetector())


def test_track_faces_clips_to_frame_and_falls_back_to_landmark_extent():
    past_right = synthetic_lm(300, 420, nose_y=120, chin_y=200)  # 400-wide frame
    past_left = synthetic_lm(-5, 100, nose_y=150, chin_y=260, top_y=100)  # x1 < 0: official box invalid
    det = ScriptedDetector({0: [past_right], 1: [past_left]})
    track = track_faces(indexed_frames(2), TemplateSettings(), detector=det)
    assert track.boxes[0] == (300, 40, 400, 210)
    # Stand-in for the official S3FD fallback: the landmarks' extent clipped to the frame, + margin.
    assert track.boxes[1] == (0, 100, 100, 270)

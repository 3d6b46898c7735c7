"""Template sources: still images in every accepted form, rotated and variable-frame-rate videos."""

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from musetalk_ops.config import Limits
from musetalk_ops.errors import InputError
from musetalk_ops.sources import read_source, resample_indices


def _pattern(width=96, height=80, value=40):
    """A flat image with a white block in the stored top-left corner."""
    img = np.full((height, width, 3), value, np.uint8)
    img[:16, :16] = 255
    return img


def test_png_is_read_exactly(astronaut_png, astronaut_rgb):
    src = read_source(astronaut_png)
    assert src.kind == "image" and src.fps == 25.0 and src.path == astronaut_png
    assert src.frames.shape == (1, 512, 512, 3) and src.frames.dtype == np.uint8
    np.testing.assert_array_equal(src.frames[0], astronaut_rgb)
    assert read_source(astronaut_png, fps=30).fps == 30.0


@pytest.mark.parametrize(
    ("ext", "options", "tolerance"),
    [
        ("webp", {"lossless": True}, 0),
        ("bmp", {}, 0),
        ("jpg", {"quality": 95}, 3.0),
        ("jpeg", {"quality": 95}, 3.0),
    ],
)
def test_other_image_formats(tmp_path, astronaut_rgb, ext, options, tolerance):
    path = tmp_path / f"face.{ext}"
    Image.fromarray(astronaut_rgb).save(path, **options)
    frame = read_source(path).frames[0]
    assert frame.shape == astronaut_rgb.shape
    assert np.abs(frame.astype(int) - astronaut_rgb).mean() <= tolerance


def test_cmyk_jpeg_becomes_rgb(tmp_path, astronaut_rgb):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(astronaut_rgb).convert("CMYK").save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    frame = read_source(path).frames[0]
    assert frame.shape == (512, 512, 3)
    assert np.abs(frame.astype(int) - astronaut_rgb).mean() < 1.0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16"])
def test_modes_are_converted_like_cv2_imread(tmp_path, mode):
    """The official code reads templates with cv2.imread: alpha dropped (not composited), palette
    expanded, grey replicated, 16-bit reduced to its high byte. Compare with cv2 itself."""
    rng = np.random.default_rng(1)
    path = tmp_path / "in.png"
    if mode == "I;16":
        cv2.imwrite(str(path), rng.integers(0, 65536, (70, 90), dtype=np.uint16))
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).quantize(16)
        im.info["transparency"] = 3
        im.save(path, transparency=3)
    else:
        channels = {"RGBA": 4, "LA": 2, "L": 1}[mode]
        data = rng.integers(0, 256, (70, 90, channels), dtype=np.uint8)
        data[..., -1][:10] = 0  # fully transparent rows keep their colour
        Image.fromarray(data.squeeze(), mode).save(path)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(read_source(path).frames[0], cv2.imread(str(path))[:, :, ::-1])


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": stored top-left shows at the top-right
    Image.fromarray(_pattern(width=96, height=80)).save(path, exif=exif, quality=95)
    frame = read_source(path).frames[0]
    assert frame.shape == (96, 80, 3)
    assert frame[:16, -16:].mean() > 230 and frame[:16, :16].mean() < 60


@pytest.mark.parametrize("ext", ["gif", "png", "webp"])
def test_animated_images_are_refused(tmp_path, ext):
    frames = [Image.fromarray(np.full((80, 80, 3), v, np.uint8)) for v in (0, 128, 255)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(InputError, match=r"is animated: use a video"):
        read_source(path)


def test_mpo_still_photo_is_not_animated(tmp_path):
    """Cameras write JPEGs with embedded extra pictures (MPO); Pillow calls them multi-frame."""
    path = tmp_path / "camera.jpg"
    Image.fromarray(_pattern()).save(
        path, format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))]
    )
    assert Image.open(path).format == "MPO"
    assert read_source(path).frames.shape == (1, 80, 96, 3)


@pytest.mark.parametrize("size", [(1, 1), (63, 200), (200, 32)])
def test_tiny_images_are_refused(tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.new("RGB", size).save(path)
    with pytest.raises(InputError, match="too small to hold a face"):
        read_source(path)


def test_bad_files_are_refused_with_one_line(tmp_path, astronaut_png):
    cases = {
        "empty.png": (b"", "is empty"),
        "garbage.png": (b"not an image at all" * 10, "not a readable image"),
        "garbage.mp4": (b"not a video at all" * 10, "not a readable video"),
        "face.tiff": (b"II*\x00", r"unsupported file type \.tiff: use an image \(.*\.png.*\) or a video"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=message) as info:
            read_source(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        read_source(tmp_path / "missing.png")
    with pytest.raises(InputError, match="more than the limit of 10000 pixels"):
        read_source(astronaut_png, limits=Limits(max_template_pixels=100 * 100))
    with pytest.raises(InputError, match="positive"):
        read_source(astronaut_png, fps=0)


def _write_video(path, frames, pts_ms=None, rotation=None, metadata=None):
    """Encode RGB frames with PyAV; ``pts_ms`` gives irregular presentation times (VFR)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        if pts_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        stream.metadata.update(metadata or {})
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def _levels(frames):
    return [round(float(f.mean()) / 20) for f in frames]


def test_constant_rate_video_keeps_every_frame(tmp_path):
    levels = [1, 3, 5, 7, 9, 11]
    path = _write_video(tmp_path / "clip.mp4", [np.full((80, 96, 3), 20 * v, np.uint8) for v in levels])
    src = read_source(path)
    assert src.kind == "video" and src.fps == 25.0
    assert src.frames.shape == (6, 80, 96, 3)
    assert _levels(src.frames) == levels


def test_display_matrix_rotation_is_applied(tmp_path):
    # Display rotation −90 (counter-clockwise) = 90° clockwise, what a player shows for a phone clip:
    # the stored top-left corner ends up at the top-right and width/height swap.
    path = _write_video(tmp_path / "phone.mp4", [_pattern()] * 3, rotation=-90)
    frames = read_source(path).frames
    assert frames.shape == (3, 96, 80, 3)
    assert frames[0, :16, -16:].mean() > 230 and frames[0, :16, :16].mean() < 60


def test_legacy_rotate_tag_is_applied(tmp_path):
    path = _write_video(tmp_path / "old.mkv", [_pattern()] * 2, metadata={"rotate": "180"})
    frames = read_source(path).frames
    assert frames.shape == (2, 80, 96, 3)
    assert frames[0, -16:, -16:].mean() > 230 and frames[0, :16, :16].mean() < 60


def test_variable_frame_rate_is_resampled(tmp_path):
    pts = [0, 40, 80, 200, 240, 400, 440, 480]  # ms; the clip ends 40 ms after the last frame
    levels = [1, 2, 3, 4, 5, 6, 7, 8]
    frames = [np.full((64, 64, 3), 20 * v, np.uint8) for v in levels]
    path = _write_video(tmp_path / "vfr.mp4", frames, pts_ms=pts)
    src = read_source(path, fps=25)
    # Output k at k·40 ms shows the last frame at or before it; 0.52 s × 25 = 13 frames.
    expected = [levels[max(i for i, p in enumerate(pts) if p <= 40 * k)] for k in range(13)]
    assert src.fps == 25.0
    assert _levels(src.frames) == expected
    # Without fps the stream's average rate is kept: 8 frames over 0.52 s.
    default = read_source(path)
    assert default.fps == pytest.approx(8 / 0.52) and len(default.frames) == 8


def test_resample_indices_tolerates_rate_approximations():
    # 29.97 asked for a 30000/1001 stream: every source frame maps to itself, none is skipped.
    seconds = np.arange(3000) * 1001 / 30000
    assert np.array_equal(resample_indices(seconds, 1001 / 30000, 29.97, 30000 / 1001), np.arange(3000))
    # Out-of-order timestamps are sorted; 50 fps output from 25 fps input doubles each frame.
    assert resample_indices(np.array([0.04, 0.0, 0.08]), 0.04, 50, 25).tolist() == [1, 1, 0, 0, 2, 2]


def test_video_limits_and_empty_streams(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", [np.zeros((80, 96, 3), np.uint8)] * 10)
    with pytest.raises(
        InputError, match=r"lasts longer than the limit of 0.2 s \(MUSETALK_MAX_TEMPLATE_SECONDS\)"
    ):
        read_source(path, limits=Limits(max_template_seconds=0.2))
    with pytest.raises(InputError, match="too small to hold a face"):
        read_source(_write_video(tmp_path / "small.mp4", [np.zeros((48, 64, 3), np.uint8)] * 2))
    no_frames = tmp_path / "no-frames.mp4"
    with av.open(str(no_frames), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        out.start_encoding()
    with pytest.raises(InputError, match=r"no video stream|no decodable video frames"):
        read_source(no_frames)
    audio_only = tmp_path / "voice.mp4"
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(InputError, match="has no video stream"):
        read_source(audio_only)

"""Template settings validation and end-to-end template preparation with demo weights."""

import numpy as np
import pytest

from musetalk_ops.errors import InputError
from musetalk_ops.settings import TemplateSettings, load_settings


def write(tmp_path, text: str):
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_defaults_and_empty_file(tmp_path):
    assert load_settings(None) == TemplateSettings()
    assert load_settings(write(tmp_path, "")) == TemplateSettings()
    d = TemplateSettings().to_dict()
    assert d == {
        "bbox_shift": 0,
        "extra_margin": 10,
        "face_box": None,
        "fps": 25.0,
        "left_cheek_width": 90,
        "mask_source": "parsing",
        "no_face": "error",
        "parsing_mode": "jaw",
        "right_cheek_width": 90,
        "version": "v15",
    }
    assert list(d) == sorted(d)


def test_settings_full_file(tmp_path):
    s = load_settings(
        write(
            tmp_path,
            "extra_margin: 20\nface_box: [10, 20, 110, 140]\nfps: 29.97\n"
            "no_face: passthrough\nwelcome_text: Hello there!\n",
        )
    )
    assert s.face_box == (10, 20, 110, 140) and s.extra_margin == 20 and s.fps == 29.97
    assert s.welcome_text == "Hello there!" and s.no_face == "passthrough"
    assert s.to_dict()["face_box"] == [10, 20, 110, 140]
    assert "welcome_text" not in s.to_dict()  # does not change the cache


def test_settings_effective_values_per_version():
    v15 = TemplateSettings(bbox_shift=5)
    assert v15.to_dict()["bbox_shift"] == 0 and v15.to_dict() == TemplateSettings().to_dict()
    assert any("bbox_shift 5 is ignored for v15" in n for n in v15.notes())
    v1 = TemplateSettings(version="v1", bbox_shift=-7)
    assert v1.shift == -7 and v1.margin == 0 and v1.mode == "raw" and v1.mask_label == "parsing-raw"
    assert TemplateSettings(mask_source="landmarks").mask_label == "landmarks"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("extra_margn: 5\n", "unknown setting 'extra_margn'"),
        ("extra_margin: 50\n", r"extra_margin: 50 is out of range \[0, 40\]"),
        ("extra_margin: '10'\n", "extra_margin: expected an integer"),
        ("extra_margin: true\n", "extra_margin: expected an integer"),
        ("bbox_shift: 2.5\n", "bbox_shift: expected an integer"),
        ("left_cheek_width: 300\n", "left_cheek_width: 300 is out of range"),
        ("parsing_mode: neck\n", "parsing_mode: 'neck' is not one of jaw, raw"),
        ("mask_source: bisenet\n", "mask_source"),
        ("version: v2\n", "version: 'v2'"),
        ("no_face: skip\n", "no_face"),
        ("fps: 0\n", "fps: 0 is out of range"),
        ("fps: fast\n", "fps: expected a number"),
        ("face_box: [10, 20, 5, 40]\n", "face_box"),
        ("face_box: [10, 20, 30]\n", "face_box: expected"),
        ("face_box: [-1, 20, 30, 40]\n", "face_box"),
        ("welcome_audio: ../secret.wav\n", "welcome_audio"),
        ("welcome_audio: a.wav\nwelcome_text: hi\n", "not both"),
        ("welcome_text: ''\n", "welcome_text"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: [1, 2\n", "invalid YAML at line"),
    ],
)
def test_settings_errors_name_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=message) as e:
        load_settings(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_settings_missing_file(tmp_path):
    with pytest.raises(InputError, match="settings file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_bundled_template_settings_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "templates"
    found = sorted(root.glob("*/settings.yaml"))
    assert found, f"no template settings under {root}"
    for settings in found:
        s = load_settings(settings)
        if s.welcome_audio:
            assert (settings.parent / s.welcome_audio).is_file()
    assert (root / "astronaut" / "source.png").is_file()


# ------------------------------------------------------------------------------ preparation, demo weights


@pytest.fixture(scope="module")
def detector():
    from musetalk_ops.faces import DlibDetector

    return DlibDetector()


def prepare(source, out, models, **kwargs):
    from musetalk_ops.prepare import prepare_template

    kwargs.setdefault("template_id", "t1")
    return prepare_template(source, out, models_root=models, device="cpu", dtype="float32", **kwargs)


def write_video(path, frames, fps=25):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def panned_clip(astronaut, offsets):
    """320² windows of the astronaut, moved by (dx, dy) and zoomed by z (then resized back to 320²)."""
    import cv2

    frames = []
    for dx, dy, z in offsets:
        size = round(320 * z)
        window = astronaut[40 + dy : 40 + dy + size, 60 + dx : 60 + dx + size]
        frames.append(cv2.resize(window, (320, 320), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def test_prepare_astronaut_image(tmp_path, astronaut_png, astronaut_rgb, demo_models, detector):
    import cv2
    import torch
    from PIL import Image

    from musetalk_ops.models.vae import encode_crops, load_vae
    from musetalk_ops.template_cache import read_cache
    from musetalk_ops.timings import Timings

    timings = Timings()
    out = prepare(astronaut_png, tmp_path / "cache", demo_models, detector=detector, timings=timings)
    template = read_cache(out)
    assert template.latents.shape == (1, 8, 32, 32) and template.cycle == "pingpong"
    assert template.manifest["mask_source"] == "parsing-jaw" and template.weights == "demo"
    assert template.manifest["settings"] == TemplateSettings().to_dict()
    (face,) = template.faces
    x1, y1, x2, y2 = face.face_box
    # dlib's box on the known face region (x 177–272, y 66–175; chin ≈178 + extra_margin 10).
    assert 170 <= x1 <= 185 and 265 <= x2 <= 280 and 50 <= y1 <= 75 and 180 <= y2 <= 195
    s = int(max(x2 - x1, y2 - y1) // 2 * 1.5)
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    assert face.crop_box == (xc - s, yc - s, xc + s, yc + s)
    assert template.masks[0].shape == (2 * s, 2 * s)
    # Latents are the VAE encoding of frame[y1:y2, x1:x2] resized to 256² with LANCZOS4.
    crop = cv2.resize(astronaut_rgb[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    expected = encode_crops(load_vae(demo_models, "cpu", torch.float32), crop[None])
    torch.testing.assert_close(template.latents, expected, rtol=1e-4, atol=1e-5)
    preview = np.asarray(Image.open(out / "preview.png"))
    assert (preview[y1 + 30, x1] == (0, 220, 0)).all()  # face box drawn in green
    assert set(timings.extra) >= {"decode", "detect", "crop", "vae", "parse", "masks", "write"}


def test_prepare_video_one_face_per_frame(tmp_path, astronaut_rgb, demo_models, detector):
    from musetalk_ops.template_cache import read_cache

    offsets = [(0, 0, 1.0), (4, 0, 1.0), (8, 2, 1.0), (8, 4, 1.05), (6, 4, 1.1), (2, 2, 1.05)]
    clip = write_video(tmp_path / "clip.mp4", panned_clip(astronaut_rgb, offsets))
    template = read_cache(prepare(clip, tmp_path / "cache", demo_models, detector=detector))
    assert len(template.faces) == 6 and all(face is not None for face in template.faces)
    assert template.cycle == "pingpong" and template.fps == 25.0 and template.latents.shape == (6, 8, 32, 32)
    xs = [face.face_box[0] for face in template.faces]
    # The window moves right by 4 then 8 px: the face moves left in the frame by as much (±3 px).
    assert abs((xs[0] - xs[1]) - 4) <= 3 and abs((xs[0] - xs[2]) - 8) <= 3
    widths = [face.face_box[2] - face.face_box[0] for face in template.faces]
    assert widths[4] < widths[0]  # zoomed out by 10 %: a smaller face
    for face, mask in zip(template.faces, template.masks, strict=True):
        assert mask.shape == (face.crop_box[3] - face.crop_box[1], face.crop_box[2] - face.crop_box[0])


def test_prepare_video_passthrough_frames(tmp_path, astronaut_rgb, demo_models, detector):
    from musetalk_ops.template_cache import read_cache

    frames = panned_clip(astronaut_rgb, [(0, 0, 1.0)] * 4)
    frames[1:3] = 128  # no face in frames 1 and 2
    clip = write_video(tmp_path / "clip.mp4", frames)
    with pytest.raises(InputError, match=r"no face found in frame\(s\) 1-2 of 4"):
        prepare(clip, tmp_path / "refused", demo_models, detector=detector)
    assert not (tmp_path / "refused").exists()
    template = read_cache(
        prepare(
            clip,
            tmp_path / "cache",
            demo_models,
            detector=detector,
            settings=TemplateSettings(no_face="passthrough"),
        )
    )
    assert template.faces[1] is None and template.faces[2] is None and template.masks[1] is None
    assert template.faces[0] is not None and template.faces[3] is not None
    assert not template.latents[1:3].any() and template.latents[0].any()


class NoDetection:
    def detect(self, frame):
        raise AssertionError("a manual face box must skip detection")


def test_prepare_manual_box_and_landmark_mask_choices(tmp_path, astronaut_png, demo_models):
    from musetalk_ops.template_cache import read_cache

    settings = TemplateSettings(face_box=(177, 66, 272, 175), extra_margin=5)
    template = read_cache(
        prepare(astronaut_png, tmp_path / "cache", demo_models, settings=settings, detector=NoDetection())
    )
    assert template.faces[0].face_box == (177, 66, 272, 180)
    assert template.manifest["settings"]["face_box"] == [177, 66, 272, 175]
    with pytest.raises(InputError, match="mask_source landmarks needs detected landmarks"):
        prepare(
            astronaut_png,
            tmp_path / "other",
            demo_models,
            settings=TemplateSettings(face_box=(177, 66, 272, 175), mask_source="landmarks"),
        )


def test_prepare_landmark_mask(tmp_path, astronaut_png, demo_models, detector):
    from musetalk_ops.template_cache import read_cache

    template = read_cache(
        prepare(
            astronaut_png,
            tmp_path / "cache",
            demo_models,
            detector=detector,
            settings=TemplateSettings(mask_source="landmarks"),
        )
    )
    assert template.manifest["mask_source"] == "landmarks"
    face, mask = template.faces[0], template.masks[0]
    s = mask.shape[0] // 2
    assert not mask[: s - mask.shape[0] // 20].any()  # upper half cleared (beyond the blur)
    # The mouth (≈ x 222, y 146 in the frame) is fully inside the lower-face polygon.
    assert mask[146 - face.crop_box[1], 222 - face.crop_box[0]] == 255


def test_prepare_no_face_writes_nothing(tmp_path, demo_models, detector):
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.new("RGB", (320, 240), (128, 128, 128)).save(grey)
    with pytest.raises(InputError, match=r"grey\.png: no face found") as e:
        prepare(grey, tmp_path / "out", demo_models, detector=detector)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png"]


def test_prepare_existing_output(tmp_path, astronaut_png, demo_models):
    from musetalk_ops.template_cache import read_cache

    settings = TemplateSettings(face_box=(177, 66, 272, 175))
    out = prepare(astronaut_png, tmp_path / "cache", demo_models, settings=settings)
    lower = TemplateSettings(face_box=(177, 66, 272, 170))
    with pytest.raises(InputError, match="already exists"):
        prepare(astronaut_png, out, demo_models, settings=lower)
    assert read_cache(out).faces[0].face_box[3] == 185
    prepare(astronaut_png, out, demo_models, settings=lower, force=True)
    assert read_cache(out).faces[0].face_box[3] == 180
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a template cache"):
        prepare(astronaut_png, other, demo_models, settings=settings, force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_prepare_missing_bisenet_weights(tmp_path, astronaut_png, demo_models):
    import shutil

    from musetalk_ops.errors import ModelFilesError
    from musetalk_ops.models.layout import ModelLayout

    models = tmp_path / "models"
    shutil.copytree(demo_models, models)
    ModelLayout(models).bisenet_weights.unlink()
    with pytest.raises(ModelFilesError, match=r"79999_iter\.pth"):
        prepare(
            astronaut_png,
            tmp_path / "cache",
            models,
            settings=TemplateSettings(face_box=(177, 66, 272, 175)),
            detector=NoDetection(),
        )
    assert not (tmp_path / "cache").exists()


def test_prepare_to_cache_reuses(tmp_path, astronaut_png, demo_models):
    from musetalk_ops.prepare import prepare_to_cache

    def prepare(**settings):
        return prepare_to_cache(
            astronaut_png,
            tmp_path,
            template_id="astro",
            settings=TemplateSettings(face_box=(177, 66, 272, 175), **settings),
            models_root=demo_models,
            device="cpu",
            dtype="float32",
        )

    first = prepare()
    assert first.parent == tmp_path / "templates" / "astro" and (first / "manifest.json").is_file()
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = prepare()
    assert again == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    changed = prepare(extra_margin=0)
    assert changed != first and changed.parent == first.parent

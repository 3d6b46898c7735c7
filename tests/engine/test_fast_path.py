"""The fast render path on the CPU: device-side paste-back against OpenCV/Pillow/``paste_face`` (exact),
and whole chunks against the reference path (same frames, one segment)."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from helpers import every_blend_triple, png_frames

from musetalk_ops.blend import crop_box_for, paste_face
from musetalk_ops.device_paste import DevicePaster, pil_blend_, resize_linear
from musetalk_ops.errors import InputError
from musetalk_ops.generator import FaceGenerator, StageClock, bucket_sizes
from musetalk_ops.models import load_models
from musetalk_ops.models import vae as vae_module
from musetalk_ops.models.vae import decode_latents
from musetalk_ops.render.chunks import render_chunk
from musetalk_ops.render.encoders import encoder_count
from musetalk_ops.render.fast import _interleave
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import Face, Template, load_template
from musetalk_ops.video import SegmentWriter, mux, probe
from musetalk_ops.yuv import i420, i420_planes, rgb_to_yuv420

# (width, height) targets from a 256² face: down- and upscaling, odd sizes, exact halving (which OpenCV
# routes to INTER_AREA), exact doubling, 1-pixel edges, extreme aspect ratios.
SIZES = [(1, 1), (2, 3), (95, 119), (128, 128), (129, 127), (200, 210), (256, 256), (300, 333)]
SIZES += [(380, 436), (512, 512), (511, 257), (7, 900), (900, 7), (640, 700)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_resize_linear_equals_opencv_exactly(width, height):
    rng = np.random.default_rng(width * 1000 + height)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    expected = cv2.resize(face, (width, height), interpolation=cv2.INTER_LINEAR)
    got = resize_linear(torch.from_numpy(face), width, height).to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected)


def test_resize_linear_random_sizes_and_sources():
    rng = np.random.default_rng(7)
    for _ in range(40):
        src_h, src_w, height, width = (int(v) for v in rng.integers(1, 700, 4))
        image = rng.integers(0, 256, (src_h, src_w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        got = resize_linear(torch.from_numpy(image), width, height).to(torch.uint8).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{src_w}x{src_h} -> {width}x{height}")


def test_torch_blend_equals_pillow_for_every_value_triple():
    dst, src, mask, expected = every_blend_triple()
    for rows in np.array_split(np.arange(4096), 8):  # bounded int32 temporaries
        sl = slice(rows[0], rows[-1] + 1)
        got = pil_blend_(
            torch.from_numpy(dst[sl]), torch.from_numpy(src[sl]).to(torch.int32), torch.from_numpy(mask[sl])
        )
        np.testing.assert_array_equal(got.numpy(), expected[sl])


def _template(frames, boxes, rng):
    """An in-memory template; a ``None`` box is a frame without a face."""
    faces, masks = [], []
    for box in boxes:
        if box is None:
            faces.append(None)
            masks.append(None)
            continue
        crop = crop_box_for(box)
        faces.append(Face(face_box=box, crop_box=crop))
        masks.append(rng.integers(0, 256, (crop[3] - crop[1], crop[2] - crop[0]), dtype=np.uint8))
    n = len(frames)
    return Template(
        id="t",
        fps=25.0,
        frames=frames,
        cycle="pingpong",
        faces=faces,
        latents=torch.zeros((n, 8, 32, 32)),
        masks=masks,
        version="v15",
        weights="demo",
        fingerprint="0" * 16,
        manifest={},
    )


def _yuv(frame: np.ndarray) -> np.ndarray:
    """A whole RGB frame as the encoder gets it: padded to even size, then packed YUV 4:2:0."""
    height, width = frame.shape[:2]
    frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return i420(*(p.numpy() for p in rgb_to_yuv420(torch.from_numpy(frame))))


@pytest.mark.parametrize(("height", "width"), [(240, 320), (239, 319)])
def test_device_paste_equals_paste_face_exactly_in_rgb_and_yuv(height, width):
    """The blended region equals ``paste_face``; the template frame's YUV with the block's planes written
    in equals the YUV of the whole ``paste_face`` frame (odd sizes: the encoder's padding included)."""
    rng = np.random.default_rng(3)
    boxes = [
        (100, 60, 195, 175),  # inside the frame
        (-30, -20, 80, 90),  # face box and crop box leave the frame top-left
        (250, 150, 330, 250),  # ... and bottom-right
        (10, 10, 138, 138),  # exactly half of 256: OpenCV's INTER_AREA special case
        (40, 30, 41, 31),  # a 1-pixel face
        (101, 61, 196, 176),  # odd edges everywhere
    ]
    frames = rng.integers(0, 256, (len(boxes), height, width, 3), dtype=np.uint8)
    template = _template(frames, boxes, rng)
    paster = DevicePaster(template, torch.device("cpu"))
    paster.load(range(len(boxes)))
    ks = [0, 1, 2, 3, 4, 5, 0, 2, 0]  # one batch: frames repeat, blocks of every size are padded together
    faces = rng.integers(0, 256, (len(ks), 256, 256, 3), dtype=np.uint8)
    composited = paster.composite(torch.from_numpy(faces), ks)
    planes = rgb_to_yuv420(composited.canvas, context=True)
    for j, k in enumerate(ks):
        plan, f = composited.plans[j], template.faces[k]
        assert plan == paster.plan(k)
        want = paste_face(frames[k], faces[j], f.face_box, template.masks[k], f.crop_box)
        (x1, y1, x2, y2), (bx1, by1, bx2, by2) = plan.region, plan.block
        if plan.empty:  # the 1-pixel face's crop box is empty: nothing to paste
            assert (want == frames[k]).all() and (paster.background(k) == _yuv(want)).all()
            continue
        rgb = frames[k].copy()
        rgb[y1:y2, x1:x2] = composited.canvas[j, 1 + y1 - by1 : 1 + y2 - by1, x1 - bx1 : x2 - bx1].numpy()
        np.testing.assert_array_equal(rgb, want, err_msg=f"face {j} (frame {k})")

        height, width = by2 - by1, bx2 - bx1
        yuv = paster.background(k)
        luma, u, v = i420_planes(yuv)
        luma[by1:by2, bx1:bx2] = planes[0][j, :height, :width].numpy()
        u[by1 // 2 : by2 // 2, bx1 // 2 : bx2 // 2] = planes[1][j, : height // 2, : width // 2].numpy()
        v[by1 // 2 : by2 // 2, bx1 // 2 : bx2 // 2] = planes[2][j, : height // 2, : width // 2].numpy()
        np.testing.assert_array_equal(yuv, _yuv(want), err_msg=f"face {j} (frame {k})")


def test_composite_refuses_frames_it_was_not_given():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (3, 120, 160, 3), dtype=np.uint8)
    paster = DevicePaster(_template(frames, [(40, 30, 100, 100)] * 3, rng), torch.device("cpu"))
    paster.load([0, 2])
    faces = torch.zeros((2, 256, 256, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"template frames \[1\] were not loaded"):
        paster.composite(faces, [0, 1])


def test_bucket_sizes():
    assert bucket_sizes(20) == (4, 8, 16, 20)
    assert bucket_sizes(32) == (4, 8, 16, 32)
    assert bucket_sizes(3) == (3,)
    assert bucket_sizes(20, "compiled") == (20,)
    assert bucket_sizes(64, "aot") == (32, 64) and bucket_sizes(48, "aot") == (24, 48)  # + a decode slice
    assert bucket_sizes(32, "aot") == (32,) and bucket_sizes(20, "aot") == (20,)


@pytest.mark.slow
def test_a_partial_batch_reuses_a_bucket_already_used(demo_models):
    """A new shape costs a fresh process more (cuDNN plans, kernel loading) than padding does."""
    models = load_models(demo_models, device="cpu", dtype=torch.float32, components=("unet", "vae"))
    generator = FaceGenerator(models.unet, models.vae, mode="eager", max_batch=8)
    assert generator.bucket(3) == 4 and generator.bucket(8) == 8
    faces = generator(torch.zeros(8, 8, 32, 32), torch.zeros(8, 50, 384), StageClock(models.device))
    assert faces.shape == (8, 256, 256, 3) and faces.dtype == torch.uint8
    assert generator.bucket(3) == 8
    partial = generator(torch.zeros(3, 8, 32, 32), torch.zeros(3, 50, 384), StageClock(models.device))
    assert partial.shape[0] == 3 and torch.equal(partial, faces[:3])  # same inputs, padded batch


@pytest.mark.slow
def test_a_bucket_decodes_only_the_slices_that_hold_its_frames(demo_models, monkeypatch):
    """Decodes of at most 4 frames (as 32 on a GPU): a bucket of 6 decodes in two slices of 3; a batch of
    2 padded to it decodes only the first, and its faces are the full batch's."""
    models = load_models(demo_models, device="cpu", dtype=torch.float32, components=("unet", "vae"))
    monkeypatch.setattr(vae_module, "DECODE_BATCH", 4)
    decoded, decode = [], models.vae.decode
    monkeypatch.setattr(models.vae, "decode", lambda z: decoded.append(len(z)) or decode(z))
    generator = FaceGenerator(models.unet, models.vae, mode="eager", max_batch=6)
    g = torch.Generator().manual_seed(0)
    latents, tokens = torch.randn(6, 8, 32, 32, generator=g), torch.randn(6, 50, 384, generator=g)
    faces = generator(latents, tokens, StageClock(models.device)).clone()
    assert decoded == [3, 3] and faces.shape == (6, 256, 256, 3)
    whole = decode_latents(models.vae, generator._unet(latents, tokens))
    assert (faces.int() - whole.int()).abs().max() <= 1  # two slices or one call: the same faces
    decoded.clear()
    partial = generator(latents[:2], tokens[:2], StageClock(models.device))
    assert decoded == [3] and torch.equal(partial, faces[:2])


def test_interleave_feeds_every_encoder_in_order():
    groups = [np.arange(0, 7), np.arange(10, 13), np.arange(20, 29)]
    order = _interleave(groups, 2)
    assert sorted(order.tolist()) == sorted(np.concatenate(groups).tolist())
    for g in groups:
        assert [v for v in order.tolist() if v in set(g.tolist())] == g.tolist()
    assert order[:6].tolist() == [0, 1, 10, 11, 20, 21]  # the first batch reaches all three encoders


def test_encoder_count():
    assert encoder_count(RenderSettings(), "reference", 1000, 25) == 1
    assert encoder_count(RenderSettings(encoders=3), "reference", 1000, 25) == 1
    assert encoder_count(RenderSettings(encoders=3), "eager", 1000, 25) == 3
    assert encoder_count(RenderSettings(encoders=8), "eager", 5, 25) == 5
    assert encoder_count(RenderSettings(), "graphs", 150, 25) == 1  # < 2 × 4 s: one encoder


def test_settings_refuse_unknown_mode_and_encoders():
    with pytest.raises(InputError, match="unknown render mode 'fast'"):
        RenderSettings(mode="fast")
    with pytest.raises(InputError, match="encoders 0"):
        RenderSettings(encoders=0)


def test_graphs_mode_needs_cuda(render_models, features, astronaut_cache, tmp_path):
    template = load_template(astronaut_cache)
    with pytest.raises(InputError, match="render mode graphs needs a CUDA GPU"):
        render_chunk(
            render_models, template, features, 0, 2, tmp_path / "x.mp4", RenderSettings(mode="graphs")
        )


@pytest.mark.slow
def test_fast_path_renders_the_reference_frames(
    render_models, features, astronaut_cache, tmp_path, speech_wav
):
    """Eager fast path (buckets, device paste, two parallel sub-segments) vs the reference path, with a
    second template frame that has no face (passed through) in the ping-pong cycle."""
    template = load_template(astronaut_cache)
    frame0 = template.frames[0]
    template = dataclasses.replace(
        template,
        frames=np.stack([frame0, frame0[:, ::-1].copy()]),
        faces=[template.faces[0], None],
        masks=[template.masks[0], None],
        latents=template.latents.expand(2, -1, -1, -1).clone(),
    )
    total = features.num_frames(template.fps)
    stop = min(total, 14)
    fast = RenderSettings(batch_size=5, device="cpu", dtype="float32", mode="eager", encoders=2)
    ref = dataclasses.replace(fast, mode="reference")
    a = render_chunk(
        render_models, template, features, 1, stop, tmp_path / "a.mp4", fast, frames_dir=tmp_path / "a"
    )
    render_chunk(
        render_models, template, features, 1, stop, tmp_path / "b.mp4", ref, frames_dir=tmp_path / "b"
    )
    got, want = png_frames(tmp_path / "a"), png_frames(tmp_path / "b")
    assert sorted(got) == sorted(want) == [f"{i:08d}.png" for i in range(1, stop)]
    for name in want:  # model batches differ (padding to buckets): float summation order only
        diff = np.abs(got[name].astype(int) - want[name].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name
    assert a.timings.extra["encoders"] == 2 and a.timings.unet > 0 and a.timings.encode > 0
    info = probe(a.path)
    assert info.frames == stop - 1 and info.keyframe_at_start and info.video_codec == "h264"

    # The joined sub-segments are an ordinary chunk segment: the merge step remuxes it with others.
    head = render_chunk(render_models, template, features, 0, 1, tmp_path / "head.mp4", fast)
    mux([head.path, a.path], speech_wav, tmp_path / "joined.mp4", comment="test")
    assert probe(tmp_path / "joined.mp4").frames == stop


def test_a_failing_encoder_fails_the_chunk_and_leaves_no_files(
    render_models, features, astronaut_cache, tmp_path, monkeypatch
):
    template = load_template(astronaut_cache)
    calls = []
    write = SegmentWriter.write_yuv

    def failing(self, frame):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        write(self, frame)

    monkeypatch.setattr(SegmentWriter, "write_yuv", failing)
    settings = RenderSettings(batch_size=4, device="cpu", dtype="float32", mode="eager", encoders=2)
    out = tmp_path / "out" / "c.mp4"
    out.parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        render_chunk(render_models, template, features, 0, 12, out, settings)
    assert list(out.parent.iterdir()) == []  # no segment, no sub-segments, no temporary directory

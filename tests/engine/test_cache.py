"""Template cache format (docs/template-cache.md): round trip, fingerprint, refusals, official avatars."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from musetalk_ops import PREPARATION_VERSION
from musetalk_ops.blend import crop_box_for
from musetalk_ops.errors import CacheError
from musetalk_ops.template_cache import (
    SCHEMA,
    Face,
    import_official_avatar,
    load_template,
    read_cache,
    template_fingerprint,
    write_cache,
)

FACE_BOX = (177, 66, 272, 185)
SETTINGS = {"version": "v15", "extra_margin": 10, "parsing_mode": "jaw", "face_box": None}


def _face_and_mask(rng, face_box):
    crop = crop_box_for(face_box)
    mask = rng.integers(0, 256, (crop[3] - crop[1], crop[2] - crop[0]), dtype=np.uint8)
    return Face(face_box, crop), mask


def _write(out, source, faces, masks, *, settings=SETTINGS, latents=None, frame_size=(512, 512), **kw):
    n = len(faces)
    latents = (
        torch.randn(n, 8, 32, 32, generator=torch.Generator().manual_seed(n)) if latents is None else latents
    )
    args = dict(
        template_id="astronaut",
        source_path=source,
        settings=settings,
        version="v15",
        weights="demo",
        fps=25.0,
        frame_size=frame_size,
        faces=faces,
        latents=latents,
        masks=masks,
        cycle="pingpong",
        mask_source="parsing-jaw",
        preview=np.zeros((32, 32, 3), np.uint8),
    )
    return write_cache(out, **{**args, **kw})


@pytest.fixture
def image_cache(tmp_path, astronaut_png):
    face, mask = _face_and_mask(np.random.default_rng(0), FACE_BOX)
    return _write(tmp_path / "cache" / "astronaut" / "fp", astronaut_png, [face], [mask]), face, mask


def test_round_trip_with_the_astronaut(tmp_path, astronaut_png, astronaut_rgb):
    face, mask = _face_and_mask(np.random.default_rng(0), FACE_BOX)
    latents = torch.randn(1, 8, 32, 32).half()
    out = _write(tmp_path / "c", astronaut_png, [face], [mask], latents=latents)
    assert sorted(p.name for p in out.iterdir()) == [
        "latents.safetensors",
        "manifest.json",
        "masks.npz",
        "preview.png",
        "source.png",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp directory left behind

    manifest = json.loads((out / "manifest.json").read_text())
    source_sha = hashlib.sha256(astronaut_png.read_bytes()).hexdigest()
    canonical = json.dumps(SETTINGS, sort_keys=True, separators=(",", ":")).encode()
    assert manifest == {
        "schema": "musetalk-template/1",
        "id": "astronaut",
        "source": {"file": "source.png", "sha256": source_sha},
        "settings": SETTINGS,
        "settings_sha256": hashlib.sha256(canonical).hexdigest(),
        "preparation_version": PREPARATION_VERSION,
        "model": {"version": "v15", "weights": "demo"},
        "fps": 25.0,
        "frame_size": [512, 512],
        "frames": 1,
        "cycle": "pingpong",
        "mask_source": "parsing-jaw",
        "faces": [
            {"face_box": list(FACE_BOX), "crop_box": [136, 37, 312, 213]}
        ],  # s = int(119 // 2 * 1.5) = 88
    }
    assert set(np.load(out / "masks.npz").files) == {"mask_00000"}

    t = read_cache(out)
    np.testing.assert_array_equal(t.frames, astronaut_rgb[None])
    assert (t.id, t.fps, t.cycle, t.version, t.weights) == ("astronaut", 25.0, "pingpong", "v15", "demo")
    assert t.faces == [face]
    assert t.latents.dtype == torch.float32 and torch.equal(t.latents, latents.float())
    np.testing.assert_array_equal(t.masks[0], mask)
    assert t.fingerprint == template_fingerprint(source_sha, SETTINGS, "demo")
    assert len(t.fingerprint) == 16 and int(t.fingerprint, 16) >= 0
    assert load_template(out).fingerprint == t.fingerprint


def _write_video(path, count):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for k in range(count):
            img = np.full((96, 128, 3), 30 * k, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_video_template_with_a_frame_without_face(tmp_path):
    source = _write_video(tmp_path / "clip.mp4", 3)
    rng = np.random.default_rng(1)
    (f0, m0), (f2, m2) = _face_and_mask(rng, (40, 20, 90, 80)), _face_and_mask(rng, (41, 21, 91, 83))
    out = _write(tmp_path / "c", source, [f0, None, f2], [m0, None, m2], frame_size=(128, 96))
    assert set(np.load(out / "masks.npz").files) == {"mask_00000", "mask_00002"}
    t = read_cache(out)
    assert t.frames.shape == (3, 96, 128, 3)
    assert t.faces == [f0, None, f2]
    assert t.masks[1] is None and np.array_equal(t.masks[2], m2)
    assert json.loads((out / "manifest.json").read_text())["faces"][1] is None


def test_fingerprint_changes_with_each_input():
    base = ("a" * 64, {"extra_margin": 10}, "demo", PREPARATION_VERSION)
    prints = {template_fingerprint(*base)}
    for i, changed in enumerate(
        ["c" * 64, {"extra_margin": 11}, "0123456789abcdef", PREPARATION_VERSION - 1]
    ):
        args = list(base)
        args[i] = changed
        prints.add(template_fingerprint(*args))
    assert len(prints) == 5
    assert template_fingerprint(*base) == template_fingerprint(*base)
    assert template_fingerprint(*base[:3]) == template_fingerprint(*base)  # this preparation by default
    assert template_fingerprint(*base[:3], preparation=None) not in prints  # an official avatar's
    # Parts cannot bleed into each other: moving a character between fields changes the print.
    assert template_fingerprint("ab", {}, "c") != template_fingerprint("a", {}, "bc")


def test_existing_cache_is_kept_unless_forced(image_cache, astronaut_png):
    out, face, mask = image_cache
    with pytest.raises(CacheError, match="already exists"):
        _write(out, astronaut_png, [face], [mask])
    new_latents = torch.ones(1, 8, 32, 32)
    _write(out, astronaut_png, [face], [mask], latents=new_latents, force=True)
    assert torch.equal(read_cache(out).latents, new_latents)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp"]  # old copy and temp dir are gone


def test_failed_write_leaves_nothing(tmp_path, astronaut_png):
    face, mask = _face_and_mask(np.random.default_rng(0), FACE_BOX)
    with pytest.raises(TypeError):
        _write(tmp_path / "c", astronaut_png, [face], [mask], preview=np.zeros((4, 4, 7), np.float64))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="mask"):
        _write(tmp_path / "c", astronaut_png, [face], [mask[1:]])
    assert list(tmp_path.iterdir()) == []


def _refused(path, message):
    with pytest.raises(CacheError, match=message) as info:
        read_cache(path)
    assert "\n" not in str(info.value)


def test_partial_cache_is_refused(image_cache):
    out = image_cache[0]
    (out / "manifest.json").unlink()
    _refused(out, r"partial cache .* \(no manifest.json\): re-run musetalk prepare")
    _refused(out.parent / "missing", "no template cache")


def test_stale_and_foreign_caches_are_refused(image_cache):
    out = image_cache[0]
    manifest = json.loads((out / "manifest.json").read_text())
    older = {k: v for k, v in manifest.items() if k != "preparation_version"}
    (out / "manifest.json").write_text(json.dumps({**older, "engine_version": "0.1.0"}))  # before #23
    _refused(out, "made by an older preparation: re-run musetalk prepare")
    (out / "manifest.json").write_text(
        json.dumps({**manifest, "preparation_version": PREPARATION_VERSION - 1})
    )
    _refused(out, "made by an older preparation: re-run musetalk prepare")
    (out / "manifest.json").write_text(
        json.dumps({**manifest, "preparation_version": PREPARATION_VERSION + 1})
    )
    _refused(out, f"made by a newer preparation \\(version {PREPARATION_VERSION + 1}, this is")
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema": "musetalk-template/9"}))
    _refused(out, "schema 'musetalk-template/9'")
    (out / "manifest.json").write_text(json.dumps({**manifest, "frames": 2}))
    _refused(out, "invalid manifest.json")
    (out / "manifest.json").write_text(json.dumps({**manifest, "source": {"file": "../x.png", "sha256": ""}}))
    _refused(out, "invalid manifest.json")
    (out / "manifest.json").write_text("{not json")
    _refused(out, "unreadable manifest.json")


def test_edited_source_is_refused(image_cache):
    out = image_cache[0]
    data = bytearray((out / "source.png").read_bytes())
    data[-20] ^= 1
    (out / "source.png").write_bytes(bytes(data))
    _refused(out, r"source.png changed since the cache was made")


def test_edited_settings_are_refused(image_cache):
    out = image_cache[0]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"]["extra_margin"] = 20
    (out / "manifest.json").write_text(json.dumps(manifest))
    _refused(out, "settings do not match")


@pytest.mark.parametrize("name", ["latents.safetensors", "masks.npz"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_files_are_refused(image_cache, name, keep):
    out = image_cache[0]
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: int(len(data) * keep)])
    _refused(out, f"damaged cache .*unreadable {name}")


def test_missing_or_wrong_files_are_refused(image_cache):
    out, face, mask = image_cache
    (out / "preview.png").unlink()
    _refused(out, "preview.png is missing")
    (out / "preview.png").write_bytes(b"")
    save_file({"latents": torch.zeros(2, 8, 32, 32)}, str(out / "latents.safetensors"))
    _refused(out, r"latents.safetensors holds \(2, 8, 32, 32\)")
    save_file({"latents": torch.zeros(1, 8, 32, 32)}, str(out / "latents.safetensors"))
    np.savez(out / "masks.npz", mask_00000=mask[:-1])
    _refused(out, "mask 0 is uint8")
    np.savez(out / "masks.npz", mask_00001=mask)
    _refused(out, "one mask per face")
    np.savez(out / "masks.npz", mask_00000=mask)
    assert read_cache(out).faces == [face]


# ----------------------------------------------------------------------------- official avatar import


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIDENCE}",))


EVIDENCE = Path("/tmp/musetalk-test-pickle-ran")


def _numpy1_pickle(obj) -> bytes:
    """A pickle as numpy 1.x writes it (module numpy.core.multiarray), as older avatars hold."""
    data = pickle.dumps(obj, protocol=3)
    assert b"cnumpy._core.multiarray\nscalar\n" in data
    return data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")


@pytest.fixture
def avatar(tmp_path):
    """An official realtime avatar directory as the official script leaves it (2N = 4 cycle frames)."""
    rng = np.random.default_rng(5)
    root = tmp_path / "avator_1"
    (root / "full_imgs").mkdir(parents=True)
    (root / "mask").mkdir()
    base = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(2)]
    cycle = [base[0], base[1], base[1], base[0]]
    boxes = [(40, 30, 100, 100), (42, 31, 101, 103)]
    boxes = boxes + boxes[::-1]
    crops = [crop_box_for(b) for b in boxes]
    masks = [rng.integers(0, 256, (c[3] - c[1], c[2] - c[0]), dtype=np.uint8) for c in crops]
    for i, frame in enumerate(cycle):
        cv2.imwrite(str(root / "full_imgs" / f"{i:08d}.png"), frame[:, :, ::-1])
        # The official code writes the 2-D mask; accept 3-channel copies too (cv2 re-reads them so).
        mask = masks[i] if i % 2 else np.repeat(masks[i][:, :, None], 3, axis=2)
        cv2.imwrite(str(root / "mask" / f"{i:08d}.png"), mask)
    coords = [(np.int64(b[0]), np.int32(b[1]), b[2], np.int64(b[3])) for b in boxes]
    (root / "coords.pkl").write_bytes(pickle.dumps(coords))
    (root / "mask_coords.pkl").write_bytes(_numpy1_pickle([[np.int32(v) for v in c] for c in crops]))
    latents = [torch.randn(1, 8, 32, 32).half() for _ in cycle]
    torch.save(latents, root / "latents.pt")
    info = {"avatar_id": "avator_1", "video_path": "data/video/yongen.mp4", "bbox_shift": 0, "version": "v15"}
    (root / "avator_info.json").write_text(json.dumps(info))
    return root, cycle, boxes, crops, masks, latents


def test_official_avatar_is_imported_as_is(avatar):
    root, cycle, boxes, crops, masks, latents = avatar
    t = import_official_avatar(root)
    assert (t.id, t.cycle, t.version, t.fps) == ("avator_1", "none", "v15", 25.0)
    np.testing.assert_array_equal(t.frames, np.stack(cycle))
    assert t.faces == [Face(b, c) for b, c in zip(boxes, crops, strict=True)]
    assert all(isinstance(v, int) for f in t.faces for v in f.face_box + f.crop_box)
    for got, want in zip(t.masks, masks, strict=True):
        np.testing.assert_array_equal(got, want)
    assert t.latents.dtype == torch.float32 and torch.equal(t.latents, torch.cat(latents).float())
    assert len(t.fingerprint) == 16
    assert load_template(root).fingerprint == t.fingerprint
    cv2.imwrite(str(root / "full_imgs" / "00000003.png"), cycle[1][:, :, ::-1])
    assert import_official_avatar(root).fingerprint != t.fingerprint


def test_official_avatar_keeps_its_latents_whatever_the_preparation_version(avatar, monkeypatch):
    """An imported avatar's latents are the official ones: no preparation version applies to them."""
    from musetalk_ops import template_cache

    root, *_, latents = avatar
    t = load_template(root)
    assert t.manifest["preparation_version"] is None
    monkeypatch.setattr(template_cache, "PREPARATION_VERSION", PREPARATION_VERSION + 1)
    again = load_template(root)
    assert torch.equal(again.latents, torch.cat(latents).float()) and again.fingerprint == t.fingerprint


def test_a_cache_of_an_older_preparation_is_a_one_line_cli_error(image_cache, tmp_path, demo_models):
    """``musetalk render`` of a cache written before #23 (manifest key engine_version) says what to do."""
    import subprocess
    import sys

    out = image_cache[0]
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["preparation_version"]
    (out / "manifest.json").write_text(json.dumps({**manifest, "engine_version": "0.1.0"}))
    (tmp_path / "a.wav").write_bytes(b"")
    argv = ["render", "--template", out, "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4"]
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *map(str, argv), "--models", str(demo_models)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"musetalk: error: cache {out} was made by an older preparation: re-run musetalk prepare --force"
    )


def test_official_placeholder_box_is_a_pass_through_frame(avatar):
    root, *_ = avatar
    boxes = pickle.loads((root / "coords.pkl").read_bytes())
    boxes[2] = (0.0, 0.0, 0.0, 0.0)  # the official coord_placeholder
    (root / "coords.pkl").write_bytes(pickle.dumps(boxes))
    (root / "mask" / "00000002.png").unlink()
    t = import_official_avatar(root)
    assert t.faces[2] is None and t.masks[2] is None and t.faces[1] is not None


def test_malicious_pickle_is_refused(avatar):
    root, *_ = avatar
    EVIDENCE.unlink(missing_ok=True)
    (root / "coords.pkl").write_bytes(pickle.dumps([_Evil()]))
    with pytest.raises(
        CacheError, match=r"coords.pkl is not a list of boxes \(refused global (posix|os)\.system"
    ):
        import_official_avatar(root)
    assert not EVIDENCE.exists()


@pytest.mark.parametrize(
    "content", [{"a": 1}, [(1, 2, 3)], [("1", 2, 3, 4)], [(1.5, 2, 3, 4)], [(True, 2, 3, 4)]]
)
def test_pickles_that_are_not_boxes_are_refused(avatar, content):
    root, *_ = avatar
    (root / "mask_coords.pkl").write_bytes(pickle.dumps(content))
    with pytest.raises(CacheError, match=r"mask_coords\.pkl is not a list of boxes"):
        import_official_avatar(root)


def test_damaged_avatar_files_are_refused(avatar):
    root, *_ = avatar
    data = (root / "latents.pt").read_bytes()
    (root / "latents.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"unreadable latents\.pt"):
        import_official_avatar(root)
    torch.save([torch.zeros(1, 8, 32, 32)] * 3, root / "latents.pt")
    with pytest.raises(CacheError, match=r"not a list of 4 \[1,8,32,32\] tensors"):
        import_official_avatar(root)
    (root / "full_imgs" / "00000003.png").unlink()
    with pytest.raises(CacheError, match="do not match"):
        import_official_avatar(root)
    (root / "avator_info.json").write_text(json.dumps({"avatar_id": "Bad Name"}))
    with pytest.raises(CacheError, match=r"bad avator_info\.json"):
        import_official_avatar(root)


def test_load_template_on_an_unrelated_directory(tmp_path):
    with pytest.raises(CacheError, match=r"holds no template cache \(manifest.json\) or official avatar"):
        load_template(tmp_path)
    assert SCHEMA == "musetalk-template/1"

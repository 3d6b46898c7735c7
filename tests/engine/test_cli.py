"""`musetalk render` end to end with demo weights, checked by decoding the MP4, and its bad-input paths."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

from musetalk_ops.video import probe


def musetalk(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


def render(template, audio, out, models, *flags):
    """`musetalk render` on the CPU with the given inputs and extra flags."""
    inputs = {"--template": template, "--audio": audio, "--out": out, "--models": models, "--device": "cpu"}
    return musetalk("render", *(str(v) for pair in inputs.items() for v in pair), *flags)


def assert_user_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("musetalk: error: ")
    assert fragment in lines[-1]


@pytest.mark.slow
def test_render_end_to_end(tmp_path, astronaut_cache, speech_wav, demo_models):
    out, stats, frames_dir = tmp_path / "out.mp4", tmp_path / "stats.json", tmp_path / "frames"
    start = time.perf_counter()
    proc = render(
        astronaut_cache, speech_wav, out, demo_models, "--stats-json", stats, "--frames-dir", frames_dir
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    print(f"\nCPU end-to-end render of {speech_wav.name}: {elapsed:.2f} s (process start to exit)")

    seconds = soundfile.info(str(speech_wav)).frames / 16000
    expected_frames = math.floor(seconds * 25)
    info = probe(out)
    assert info.video_codec == "h264" and info.pix_fmt == "yuv420p"
    assert info.audio_codec == "aac"
    assert (info.width, info.height) == (512, 512)
    assert info.frames == expected_frames  # all T frames (the official realtime script drops the last)
    assert info.fps == pytest.approx(25)
    assert info.duration == pytest.approx(expected_frames / 25, abs=0.05)
    assert info.audio_duration <= expected_frames / 25 + 1 / 25 + 0.03
    assert "generated" in info.comment.lower()
    assert info.color_primaries == "bt709"
    assert len(list(frames_dir.glob("*.png"))) == expected_frames

    timings = json.loads(stats.read_text())
    for key in (
        "audio_features",
        "unet",
        "vae_decode",
        "composite",
        "encode",
        "mux",
        "load",
        "total",
        "frames",
        "video_seconds",
        "fps",
        "rtf",
        "device",
        "dtype",
        "batch_size",
        "weights",
    ):
        assert key in timings
    assert timings["frames"] == expected_frames
    assert timings["weights"] == "demo" and timings["device"] == "cpu" and timings["dtype"] == "float32"
    assert timings["mode"] == "reference"  # the CPU default
    assert timings["unet"] > 0 and timings["vae_decode"] > 0 and timings["encode"] > 0
    assert "demo" in proc.stderr  # demo renders are labelled


@pytest.mark.slow
def test_render_from_a_source_image_prepares_on_the_fly(tmp_path, astronaut_png, speech_wav, demo_models):
    out = tmp_path / "out.mp4"
    proc = render(astronaut_png, speech_wav, out, demo_models, "--fps", "20")
    assert proc.returncode == 0, proc.stderr
    seconds = soundfile.info(str(speech_wav)).frames / 16000
    assert probe(out).frames == math.floor(seconds * 20)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # the on-the-fly cache is gone


def test_missing_audio(tmp_path, astronaut_cache, demo_models):
    out = tmp_path / "out.mp4"
    proc = render(astronaut_cache, tmp_path / "nope.wav", out, demo_models)
    assert_user_error(proc, "nope.wav")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.wav", b"", "empty.wav"),
        ("noise.wav", b"this is not audio at all" * 100, "noise.wav"),
        ("speech.txt", b"hello", ".txt"),
    ],
)
def test_bad_audio(tmp_path, astronaut_cache, demo_models, name, content, fragment):
    audio = tmp_path / name
    audio.write_bytes(content)
    out = tmp_path / "out.mp4"
    proc = render(astronaut_cache, audio, out, demo_models)
    assert_user_error(proc, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_silent_audio(tmp_path, astronaut_cache, demo_models):
    audio = tmp_path / "silence.wav"
    soundfile.write(audio, [0.0] * 16000, 16000)
    proc = render(astronaut_cache, audio, tmp_path / "o.mp4", demo_models)
    assert_user_error(proc, "silent")
    assert not (tmp_path / "o.mp4").exists()


def test_unknown_template_directory(tmp_path, speech_wav, demo_models):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = render(empty, speech_wav, tmp_path / "o.mp4", demo_models)
    assert_user_error(proc, "empty")
    assert not (tmp_path / "o.mp4").exists()


def test_missing_weights(tmp_path, astronaut_cache, speech_wav):
    proc = render(astronaut_cache, speech_wav, tmp_path / "o.mp4", tmp_path / "no-models")
    assert_user_error(proc, "no-models")
    assert not (tmp_path / "o.mp4").exists()


def test_output_must_be_mp4_in_an_existing_directory(tmp_path, astronaut_cache, speech_wav, demo_models):
    assert_user_error(render(astronaut_cache, speech_wav, tmp_path / "o.avi", demo_models), ".mp4")
    missing_dir = tmp_path / "missing" / "o.mp4"
    assert_user_error(render(astronaut_cache, speech_wav, missing_dir, demo_models), "does not exist")
    unwritable = Path("/proc/musetalk-test.mp4")  # no file can be created in /proc, not even by root
    assert_user_error(render(astronaut_cache, speech_wav, unwritable, demo_models), "cannot write in /proc")


def test_cuda_requested_without_cuda(tmp_path, astronaut_cache, speech_wav, demo_models):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = render(astronaut_cache, speech_wav, tmp_path / "o.mp4", demo_models, "--device", "cuda")
    assert_user_error(proc, "CUDA is not available")


@pytest.mark.slow
def test_models_demo_and_check(tmp_path):
    root = tmp_path / "weights"
    assert musetalk("models", "demo", root).returncode == 0
    proc = musetalk("models", "check", root)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout
    (root / "musetalkV15" / "unet.pth").unlink()
    assert_user_error(musetalk("models", "check", root), "unet.pth")

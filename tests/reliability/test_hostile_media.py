"""A corpus of broken and unusual media: broken files are refused with one clear line (without
decoding what they only claim to hold); valid but unusual ones are converted and rendered."""

import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from musetalk_ops.audio import load_audio
from musetalk_ops.errors import InputError
from musetalk_ops.sources import read_source

HUGE_SIDE = 20000
FACE_BOX = [177, 66, 272, 175]  # the astronaut's landmark box: no face detector needed


def wav_header(rate: int, channels: int, data_bytes: int) -> bytes:
    """A 16-bit PCM WAV header whose data chunk claims ``data_bytes``."""
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def huge_png(path: Path, side: int = HUGE_SIDE) -> Path:
    """A valid all-black 1-bit PNG of side × side pixels, written in ~50 KB without a pixel buffer."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def m4a(path: Path, seconds: float = 1.0) -> Path:
    """A real AAC-in-MP4 file (tone)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        t = np.arange(int(16000 * seconds)) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            frame.rate = 16000
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def video_without_frames(path: Path) -> Path:
    """A container with a header and a video stream but not one frame."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        out.start_encoding()
        out.mux(stream.encode(None))
    return path


def sparse_ten_hour_wav(path: Path, head: bytes) -> Path:
    """A 1.15 GB WAV that really holds 10 hours (sparse: only its first bytes take disk space)."""
    data_bytes = 10 * 3600 * 16000 * 2
    with open(path, "wb") as f:
        f.write(wav_header(16000, 1, data_bytes) + head)
        f.truncate(44 + data_bytes)
    return path


def audio_only_mp4(path: Path) -> Path:
    return m4a(path.with_suffix(".m4a")).rename(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, speech_wav) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    speech = speech_wav.read_bytes()
    (d / "empty.wav").write_bytes(b"")
    (d / "header-only.wav").write_bytes(speech[:44])
    (d / "cut-header.wav").write_bytes(speech[:20])
    (d / "png-bytes.wav").write_bytes(_png_bytes(64))
    (d / "random.mp3").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (d / "text.flac").write_bytes(b"this is not audio at all\n" * 40)
    (d / "lying-header.wav").write_bytes(wav_header(16000, 1, 10 * 3600 * 16000 * 2) + speech[44:])
    sparse_ten_hour_wav(d / "ten-hours.wav", speech[44:])
    (d / "silent.wav").write_bytes(wav_header(16000, 1, 32000) + b"\x00" * 32000)
    (d / "audio.exe").write_bytes(speech)
    full = m4a(d / "full.m4a").read_bytes()
    (d / "truncated.m4a").write_bytes(full[: len(full) // 3])
    (d / "tiny.png").write_bytes(_png_bytes(1))
    (d / "empty.png").write_bytes(b"")
    (d / "cut.jpg").write_bytes(_jpeg_bytes()[:300])
    (d / "text.png").write_bytes(b"<html>not an image</html>")
    huge_png(d / "huge.png")
    huge_png(d / "big.png", 8000)
    video_without_frames(d / "no-frames.mp4")
    video_without_frames(d / "no-frames.mkv")
    audio_only_mp4(d / "audio-only.mp4")
    (d / "random.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    return d


def _png_bytes(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


AUDIO_CASES = {
    "empty.wav": "empty (0 bytes)",
    "header-only.wav": "no audio samples",
    "cut-header.wav": "not a readable audio file",
    "png-bytes.wav": "the file has no audio track",
    "random.mp3": "not a readable audio file",
    "text.flac": "no audio samples",
    "ten-hours.wav": "the audio is 36000.0 s long, over the 600 s limit",
    "silent.wav": "the audio is silent",
    "audio.exe": "unsupported audio type .exe",
    "truncated.m4a": "not a readable audio file",
}
SOURCE_CASES = {
    "tiny.png": "is 1×1: too small to hold a face",
    "empty.png": "is empty (0 bytes)",
    "cut.jpg": "is not a readable image",
    "text.png": "is not a readable image",
    "huge.png": "(400000000 pixels) exceeds limit",  # Pillow's own bomb guard, from the header
    "big.png": "is 8000×8000: more than the limit of 16777216 pixels",  # ours, from the header
    "no-frames.mp4": "has no video stream",  # libavformat drops an MP4 track without samples
    "no-frames.mkv": "is not a readable video",
    "audio-only.mp4": "has no video stream",
    "random.mp4": "is not a readable video",
}


def assert_refused_in_one_line(read, path: Path, expected: str) -> None:
    """``read(path)`` raises an InputError within 10 s: one line naming the file and ``expected``."""
    start = time.monotonic()
    with pytest.raises(InputError) as refused:
        read(path)
    message = str(refused.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("name", sorted(AUDIO_CASES))
def test_broken_audio_is_refused_with_one_line(corpus, name):
    assert_refused_in_one_line(load_audio, corpus / name, AUDIO_CASES[name])


@pytest.mark.parametrize("name", sorted(SOURCE_CASES))
def test_broken_template_sources_are_refused_with_one_line(corpus, name):
    assert_refused_in_one_line(read_source, corpus / name, SOURCE_CASES[name])


def test_a_header_that_lies_about_its_length_decodes_what_is_there(corpus, speech_wav):
    """A header claiming 10 hours over 1.5 s of samples: libsndfile clamps to the file, nothing more
    is allocated, and the result is exactly the honest file's."""
    assert np.array_equal(load_audio(corpus / "lying-header.wav"), load_audio(speech_wav))


def test_huge_claims_are_refused_without_decoding(corpus):
    """20000² and 8000² images (1.2 GB and 192 MB as RGB) and a real 10-hour WAV are refused from
    their headers: the peak memory of a fresh process doing all three stays far below a decode."""
    script = (
        "import resource, sys\n"
        "from musetalk_ops.audio import load_audio\n"
        "from musetalk_ops.errors import InputError\n"
        "from musetalk_ops.sources import read_source\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        (load_audio if path.endswith('.wav') else read_source)(path)\n"
        "    except InputError as e:\n"
        "        print(e)\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    names = ("huge.png", "big.png", "ten-hours.wav")
    done = subprocess.run(
        [sys.executable, "-c", script, *(str(corpus / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    *errors, rss = done.stdout.strip().splitlines()
    assert len(errors) == 3, done.stdout
    assert "(400000000 pixels) exceeds limit" in errors[0] and "8000×8000" in errors[1]
    assert "the audio is 36000.0 s long, over the 600 s limit" in errors[2]
    base_kib, peak_kib = map(int, rss.split())
    assert peak_kib - base_kib < 100 * 1024, f"grew by {(peak_kib - base_kib) // 1024} MiB"


# Valid but unusual media: converted like the official loaders would, then rendered end to end.


@pytest.fixture(scope="module")
def unusual_audio(tmp_path_factory, speech_wav) -> dict[str, Path]:
    """The 16 kHz mono speech, and sox conversions of it to 8 channels at 48 kHz and to 192 kHz."""
    d = tmp_path_factory.mktemp("unusual-audio")
    converted = {"mono16k": speech_wav}
    for name, rate, channels in (("8ch48k", 48000, 8), ("192k", 192000, 2)):
        converted[name] = d / f"{name}.wav"
        argv = [
            "sox",
            str(speech_wav),
            "-r",
            str(rate),
            "-c",
            str(channels),
            "-b",
            "24",
            str(converted[name]),
        ]
        subprocess.run(argv, check=True, timeout=60)
    return converted


def test_multichannel_and_high_rate_audio_is_converted(unusual_audio):
    """8 identical channels average to the mono signal; 192 kHz resamples to the librosa length rule
    and to the same speech (sox made all three from one espeak waveform)."""
    mono = load_audio(unusual_audio["mono16k"])
    for name, rate in (("8ch48k", 48000), ("192k", 192000)):
        wav = load_audio(unusual_audio[name])
        frames = sf.info(unusual_audio[name]).frames
        assert wav.dtype == np.float32 and wav.ndim == 1
        assert len(wav) == -(-frames * 16000 // rate)  # ceil(n · 16000 / rate)
        n = min(len(wav), len(mono))
        corr = np.corrcoef(wav[:n], mono[:n])[0, 1]
        assert corr > 0.98, f"{name}: correlation {corr:.3f} with the 16 kHz original"


def unusual_sources(d: Path, astronaut_rgb: np.ndarray) -> dict[str, tuple[Path, np.ndarray]]:
    """(file, the RGB frame the engine must see) for CMYK, alpha and odd-sized templates."""
    odd = astronaut_rgb[:383, :511]  # odd width and height; the face box stays inside
    rgba = np.dstack([astronaut_rgb, np.linspace(0, 255, 512 * 512).reshape(512, 512).astype(np.uint8)])
    cmyk = d / "cmyk.jpg"
    Image.fromarray(odd).convert("CMYK").save(cmyk, quality=95)
    alpha = d / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(alpha)
    return {
        "cmyk-odd": (cmyk, np.asarray(Image.open(cmyk).convert("RGB"))),
        "alpha": (alpha, rgba[..., :3]),  # alpha dropped, not composited (cv2.imread's behaviour)
    }


@pytest.mark.slow
def test_unusual_templates_and_audio_render_end_to_end(
    tmp_path, astronaut_rgb, unusual_audio, demo_models, monkeypatch
):
    from musetalk_ops.prepare import prepare_template
    from musetalk_ops.render.file import render_file
    from musetalk_ops.render.settings import RenderSettings
    from musetalk_ops.settings import TemplateSettings
    from musetalk_ops.video import probe

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    pairs = {"cmyk-odd": "8ch48k", "alpha": "192k"}
    for name, (source, expected) in unusual_sources(tmp_path, astronaut_rgb).items():
        decoded = read_source(source).frames[0]
        assert decoded.shape == expected.shape and np.array_equal(decoded, expected)
        cache = prepare_template(
            source,
            tmp_path / f"cache-{name}",
            template_id=name,
            settings=TemplateSettings(face_box=FACE_BOX),
            models_root=demo_models,
            device="cpu",
            dtype="float32",
        )
        audio = unusual_audio[pairs[name]]
        out = tmp_path / f"{name}.mp4"
        settings = RenderSettings(device="cpu", dtype="float32", models_root=demo_models)
        timings = render_file(cache, audio, out, settings, progress=False)
        info = probe(out)
        frames = sf.info(audio).frames * 25 // sf.info(audio).samplerate
        height, width = expected.shape[:2]
        assert info.frames == timings.frames == frames and info.audio_codec == "aac"
        assert (info.width, info.height) in ((width, height), (width + width % 2, height + height % 2))
        video = _first_frame(out)[:height, :width].astype(int)
        crop = json.loads((cache / "manifest.json").read_text())["faces"][0]["crop_box"]
        outside = np.ones((height, width), bool)
        outside[max(crop[1], 0) : crop[3], max(crop[0], 0) : crop[2]] = False
        error = np.abs(video - expected.astype(int))[outside].mean()
        assert error < 3, f"{name}: mean error {error:.2f} outside the face crop"


def _first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")

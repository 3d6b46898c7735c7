"""Audio path (docs/reference.md §4, P6–P9): decoding, Whisper states, frame windows, positional encoding.

References are computed independently: librosa itself for decoding, raw WAV bytes, hand-run encoder
submodules for the Whisper states, literal transcriptions of the official index arithmetic for windows.
"""

import copy
import math
import struct
import subprocess
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from musetalk_ops.audio import (
    AUDIO_TYPES,
    AudioFeatures,
    add_positional_encoding,
    extract_features,
    load_audio,
    positional_encoding,
)
from musetalk_ops.config import Limits
from musetalk_ops.errors import CacheError, InputError, ModelFilesError

# ---------------------------------------------------------------------------------------------- files


def sox(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(["sox", str(src), *args, str(dst)], check=True)
    return dst


def pyav_encode(src: Path, dst: Path, codec: str) -> Path:
    """Encode a WAV with PyAV; pts from 0 so the muxer records the encoder delay (edit list)."""
    samples, rate = sf.read(src, dtype="float32", always_2d=True)
    layout = "stereo" if samples.shape[1] == 2 else "mono"
    with av.open(str(dst), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return dst


@pytest.fixture(scope="module")
def files(speech_wav, tmp_path_factory) -> dict[str, Path]:
    """The espeak sentence in every accepted container, some at other rates / channel counts."""
    d = tmp_path_factory.mktemp("formats")
    s44 = sox(speech_wav, d / "s44.wav", "-r", "44100", "-c", "2")
    return {
        "wav": speech_wav,
        "wav48-stereo": sox(speech_wav, d / "s48.wav", "-r", "48000", "-c", "2"),
        "wav192-8ch": sox(speech_wav, d / "s192.wav", "-r", "192000", "-c", "8"),
        "flac": sox(speech_wav, d / "s.flac", "-r", "22050"),
        "ogg": sox(speech_wav, d / "s.ogg", "-r", "44100", "-c", "2"),
        "mp3": pyav_encode(s44, d / "s.mp3", "libmp3lame"),
        "m4a": pyav_encode(s44, d / "s.m4a", "aac"),
        "aac": pyav_encode(s44, d / "s.aac", "aac"),  # raw ADTS: cannot signal the encoder delay
    }


def wav_bytes(path: Path) -> np.ndarray:
    """16-bit PCM samples of a plain WAV read straight from the bytes, scaled like libsndfile."""
    data = path.read_bytes()
    at = data.index(b"data") + 8
    return np.frombuffer(data[at:], "<i2").astype(np.float32) / 32768


def write_wav_header(path: Path, data_bytes: int, rate: int = 16000) -> None:
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    path.write_bytes(
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int = 800) -> int:
    n = min(len(a), len(b)) - 2 * max_lag
    scores = [
        float(np.dot(a[max_lag + k : max_lag + k + n], b[max_lag : max_lag + n]))
        for k in range(-max_lag, max_lag + 1)
    ]
    return int(np.argmax(scores)) - max_lag


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("kind", ["wav", "wav48-stereo", "wav192-8ch", "flac", "ogg", "mp3"])
def test_load_audio_equals_librosa(files, kind):
    import librosa  # first use on a machine compiles numba caches (~17 s); only this test needs it

    ours = load_audio(files[kind])
    theirs, rate = librosa.load(files[kind], sr=16000)
    assert rate == 16000 and ours.dtype == np.float32 and ours.ndim == 1
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_16k_mono_wav_is_the_pcm_samples(speech_wav):
    np.testing.assert_array_equal(load_audio(speech_wav), wav_bytes(speech_wav))


def test_other_rates_and_channels_convert_back_to_the_speech(files):
    speech = wav_bytes(files["wav"])
    for kind in ("wav48-stereo", "wav192-8ch"):
        out = load_audio(files[kind])
        assert len(out) == len(speech)  # ceil(n · 16000 / rate) of an exact multiple
        assert np.corrcoef(out, speech)[0, 1] > 0.999
        assert best_lag(out, speech) == 0


def test_channels_are_averaged(tmp_path, speech_wav):
    left = wav_bytes(speech_wav)
    path = tmp_path / "left-only.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), left / 2)


@pytest.mark.parametrize(
    ("kind", "lag", "similarity"), [("mp3", 0, 0.99), ("m4a", 0, 0.99), ("aac", 372, 0.95)]
)
def test_lossy_formats_decode_aligned(files, kind, lag, similarity):
    """MP3 (LAME header) and M4A (edit list) come out with the encoder delay removed; raw ADTS keeps
    its 1024 priming samples at 44.1 kHz (371.5 at 16 kHz, hence the looser similarity)."""
    speech = wav_bytes(files["wav"])
    out = load_audio(files[kind])
    assert abs(len(out) - lag - len(speech)) <= 400  # at most one AAC frame of padding at 44.1 kHz
    assert abs(best_lag(out, speech) - lag) <= 1
    n = min(len(out) - lag, len(speech))
    assert np.corrcoef(out[lag : lag + n], speech[:n])[0, 1] > similarity


def refusal_cases(tmp: Path, files: dict[str, Path]) -> list[tuple[Path, Limits | None, str]]:
    rng = np.random.default_rng(0)
    (tmp / "empty.wav").write_bytes(b"")
    for ext in ("wav", "mp3", "m4a"):
        (tmp / f"noise.{ext}").write_bytes(rng.bytes(4000))
    (tmp / "text.ogg").write_text("not audio at all\n" * 50)
    (tmp / "speech.txt").write_bytes(files["wav"].read_bytes())
    sf.write(tmp / "zeros.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp / "hiss.flac", rng.normal(0, 1e-6, 16000).astype(np.float32), 16000, subtype="PCM_24")
    sf.write(tmp / "nan.wav", np.array([0.5, np.nan, 0.1] * 100, np.float32), 16000, subtype="FLOAT")
    write_wav_header(tmp / "hours-no-data.wav", 0xFFFFFF00)
    short = Limits(max_audio_seconds=1.0)
    return [
        (tmp / "missing.wav", None, "no such audio file"),
        (tmp / "empty.wav", None, "empty (0 bytes)"),
        (tmp / "noise.wav", None, "corrupt or not audio"),
        (tmp / "noise.mp3", None, "corrupt or not audio"),
        (tmp / "noise.m4a", None, "corrupt or not audio"),
        (tmp / "text.ogg", None, "corrupt or not audio"),
        (tmp / "speech.txt", None, "unsupported audio type .txt; accepted: " + ", ".join(AUDIO_TYPES)),
        (tmp / "zeros.wav", None, "silent"),
        (tmp / "hiss.flac", None, "silent"),
        (tmp / "nan.wav", None, "NaN or infinite"),
        (tmp / "hours-no-data.wav", None, "contains no audio samples"),
        (files["wav"], short, "over the 1 s limit"),
        (files["flac"], short, "over the 1 s limit"),
        (files["m4a"], short, "over the 1 s limit"),
    ]


def test_refusals_are_one_line_input_errors(tmp_path, files):
    for path, limits, message in refusal_cases(tmp_path, files):
        with pytest.raises(InputError) as info:
            load_audio(path, limits)
        text = str(info.value)
        assert message in text and str(path) in text and "\n" not in text, (path, text)


def test_limit_is_read_from_the_environment(files, monkeypatch):
    monkeypatch.setenv("MUSETALK_MAX_AUDIO_SECONDS", "1.2")
    with pytest.raises(InputError, match=r"over the 1\.2 s limit"):
        load_audio(files["wav"])
    monkeypatch.setenv("MUSETALK_MAX_AUDIO_SECONDS", "2")
    assert len(load_audio(files["wav"])) > 16000


def test_ten_hour_header_is_refused_without_decoding(tmp_path):
    path = tmp_path / "ten-hours.wav"
    data_bytes = 10 * 3600 * 16000 * 2
    write_wav_header(path, data_bytes)
    with path.open("r+b") as f:  # sparse: 1.15 GB of real (zero) samples behind a true header
        f.truncate(44 + data_bytes)
    began = time.perf_counter()
    with pytest.raises(InputError, match=r"36000\.0 s long, over the 600 s limit"):
        load_audio(path, Limits())
    assert time.perf_counter() - began < 1.0


# ------------------------------------------------------------------------------ frame count, windows


@pytest.mark.parametrize(
    ("num_samples", "fps", "frames"),
    [
        (128000, 25, 200),  # 8.0 s
        (128000, 25.0, 200),
        (128000, 30, 240),
        (129920, 25, 203),  # 8.12 s: float (129920/16000)·25 = 202.99999999999997
        (16000 * 100, 29.97, 2997),  # float 29.97 is below 2997/100: a float product gives 2996
        (16000 * 1001, 30000 / 1001, 30000),
        (16000 * 1001, Fraction(30000, 1001), 30000),
        (160000, 23.976, 239),
        (496000, 25, 775),  # 31 s
        (319, 25, 0),
        (16000, 12.5, 12),
    ],
)
def test_num_frames(num_samples, fps, frames):
    features = AudioFeatures(torch.zeros(1, 1, 1).expand(num_samples // 320, 5, 384), num_samples)
    assert features.num_frames(fps) == frames
    assert features.duration == num_samples / 16000


@pytest.mark.parametrize("fps", [0, -25, float("nan"), float("inf")])
def test_bad_fps_is_an_input_error(fps):
    with pytest.raises(InputError, match="fps must be a positive number"):
        AudioFeatures(torch.zeros(50, 5, 384), 16000).num_frames(fps)


def coded(num_samples: int, dim: int = 384) -> AudioFeatures:
    """States whose value tells their own row and layer: 10·(row + 1) + layer (zero = padding)."""
    rows = num_samples // 320
    value = 10 * (torch.arange(rows)[:, None] + 1) + torch.arange(5)[None, :]
    return AudioFeatures(value[:, :, None].expand(rows, 5, dim).float().contiguous(), num_samples)


def token_values(rows: list[int | None]) -> list[int]:
    """The 50 token values a window of 10 rows must carry (token 5·t + layer), zero for padding."""
    return [0 if r is None else 10 * (r + 1) + layer for r in rows for layer in range(5)]


def official_rows(num_rows: int, num_samples: int, fps: int) -> list[list[int | None]]:
    """Literal transcription of get_whisper_chunk (36163fc) with its float arithmetic, rows as indices.

    Where the official code aborts (its assert: at fps ≥ 50 the last windows overrun the right
    padding) the rows it lacks are taken as zero padding, which is what we produce instead.
    """
    multiplier = 50 / fps
    num_frames = math.floor((num_samples / 16000) * fps)
    pad = math.ceil(multiplier)
    padded = [None] * (pad * 2) + list(range(num_rows)) + [None] * (pad * 3 * 2)
    out = []
    for i in range(num_frames):
        a = math.floor(i * multiplier)
        clip = padded[a : a + 10]
        out.append(clip + [None] * (10 - len(clip)))
    return out


def test_windows_at_25fps_are_centred_on_two_features_per_frame():
    features = coded(16000 * 3)  # F = 150, T = 75
    windows = features.windows(25, 0, 75)
    assert windows.shape == (75, 50, 384) and windows.dtype == torch.float32
    for i in range(75):
        rows = [r if 0 <= r < 150 else None for r in range(2 * i - 4, 2 * i + 6)]
        assert windows[i, :, 0].tolist() == token_values(rows)
    assert torch.equal(windows[:, :, 0:1].expand(-1, -1, 384), windows)


@pytest.mark.parametrize("fps", [24, 25, 30, 50, 60])
def test_windows_equal_the_official_code_for_integer_fps(fps):
    num_samples = 31 * 16000 + 4321
    features = coded(num_samples, dim=2)
    expected = official_rows(num_samples // 320, num_samples, fps)
    got = features.windows(fps, 0, features.num_frames(fps))
    assert len(expected) == len(got)
    assert [w[:, 0].tolist() for w in got] == [token_values(rows) for rows in expected]


@pytest.mark.parametrize(("fps", "step"), [(Fraction(2997, 100), Fraction(5000, 2997)), (60, Fraction(5, 6))])
def test_windows_for_fractional_and_high_fps(fps, step):
    num_samples = 9 * 16000 + 777
    features = coded(num_samples, dim=2)
    total = features.num_frames(fps)
    assert total == num_samples * fps // 16000
    got = features.windows(float(fps), 0, total)
    num_rows, left = num_samples // 320, 2 * math.ceil(step)
    for i in range(total):
        a = math.floor(i * step) - left
        rows = [r if 0 <= r < num_rows else None for r in range(a, a + 10)]
        assert got[i, :, 0].tolist() == token_values(rows)


def test_29_97_fps_is_not_truncated_to_29():
    features = coded(16000 * 60)
    assert features.num_frames(29.97) == 1798  # the official int(fps) would give 1740
    # frame 1000 starts at ⌊1000 · 50/29.97⌋ = 1668 (official: ⌊1000 · 50/29⌋ = 1724)
    assert features.windows(29.97, 1000, 1001)[0, 0, 0].item() == 10 * (1668 - 4 + 1)


def test_last_frame_of_an_8_second_clip():
    features = coded(128000)  # F = 400, T = 200
    last = features.windows(25, 199, 200)[0, :, 0].tolist()
    assert last == token_values([394, 395, 396, 397, 398, 399, None, None, None, None])
    first = features.windows(25, 0, 1)[0, :, 0].tolist()
    assert first == token_values([None, None, None, None, 0, 1, 2, 3, 4, 5])


def test_windows_of_a_range_equal_the_slice_of_all_windows():
    features = coded(16000 * 5 + 100)
    for fps in (25, 30, 29.97, 60):
        full = features.windows(fps, 0, features.num_frames(fps))
        for start, stop in [
            (0, 1),
            (3, 17),
            (40, 40),
            (features.num_frames(fps) - 7, features.num_frames(fps)),
        ]:
            assert torch.equal(features.windows(fps, start, stop), full[start:stop])


def test_windows_keep_dtype_and_check_the_range():
    features = AudioFeatures(coded(16000).states.half(), 16000)
    assert features.windows(25, 0, 25).dtype == torch.float16
    for start, stop in [(-1, 3), (5, 4), (0, 26)]:
        with pytest.raises(ValueError, match="outside"):
            features.windows(25, start, stop)


# ------------------------------------------------------------------------------ positional encoding


def test_positional_encoding_matches_the_formula():
    table = positional_encoding()
    assert table.shape == (1, 50, 384) and table.dtype == torch.float32
    expected = np.zeros((50, 384))
    for p in range(50):
        for k in range(192):
            angle = p * math.exp(-2 * k * math.log(10000) / 384)
            expected[p, 2 * k], expected[p, 2 * k + 1] = math.sin(angle), math.cos(angle)
    # float32 angles (as in the official buffer) are off by ≤ 3.1e-6 at position 49
    np.testing.assert_allclose(table[0].numpy(), expected, rtol=0, atol=4e-6)
    np.testing.assert_allclose(table[0, :5].numpy(), expected[:5], rtol=0, atol=1e-6)
    assert torch.equal(table[0, 0, 0::2], torch.zeros(192)) and torch.equal(
        table[0, 0, 1::2], torch.ones(192)
    )


def test_add_positional_encoding_in_the_tokens_dtype():
    tokens = torch.randn(3, 50, 384, generator=torch.Generator().manual_seed(0)).half()
    out = add_positional_encoding(tokens)
    assert out.dtype == torch.float16 and out.shape == tokens.shape
    assert torch.equal(out, tokens + positional_encoding().half())


# ------------------------------------------------------------------------------------ Whisper states


@pytest.fixture(scope="module")
def tiny_whisper() -> SimpleNamespace:
    """Random whisper-tiny-shaped encoder (official feature extractor settings), non-trivial final LN."""
    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        num_mel_bins=80,
        max_source_positions=1500,
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=64,
        vocab_size=64,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    encoder = WhisperModel(config).eval().encoder
    with torch.no_grad():
        encoder.layer_norm.weight.uniform_(0.5, 1.5)
        encoder.layer_norm.bias.normal_(0, 0.5)
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    return SimpleNamespace(
        feature_extractor=extractor, encoder=encoder, device=torch.device("cpu"), dtype=torch.float32
    )


def attention(module, x: torch.Tensor, heads: int = 6) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = (
        proj(x).view(b, n, heads, d // heads).transpose(1, 2)
        for proj in (module.q_proj, module.k_proj, module.v_proj)
    )
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return module.out_proj((weights @ v).transpose(1, 2).reshape(b, n, d))


@torch.no_grad()
def hand_states(whisper, wav: np.ndarray) -> torch.Tensor:
    """[1500, 5, 384] from the encoder's submodules: embeddings+positions, layers 0–2, LN(layer 3)."""
    enc = whisper.encoder
    mel = whisper.feature_extractor(wav, sampling_rate=16000, return_tensors="pt").input_features
    assert mel.shape == (1, 80, 3000)
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).transpose(1, 2) + enc.embed_positions.weight
    states = [x]
    for layer in enc.layers:
        x = x + attention(layer.self_attn, layer.self_attn_layer_norm(x))
        x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        states.append(x)
    pre_norm = states[-1]
    states[-1] = enc.layer_norm(pre_norm)
    assert (states[-1] - pre_norm).abs().max() > 0.1  # the two conventions are distinguishable
    return torch.stack(states, dim=2)[0]


@pytest.fixture(scope="module")
def speech_reference(tiny_whisper, speech_wav) -> tuple[np.ndarray, torch.Tensor]:
    """The speech waveform and its hand-computed states, trimmed to ⌊L / 320⌋ rows."""
    wav = load_audio(speech_wav)
    return wav, hand_states(tiny_whisper, wav)[: len(wav) * 50 // 16000]


def with_encoder(whisper: SimpleNamespace, encoder, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(whisper), "encoder": encoder, "dtype": dtype})


def test_states_are_the_official_five_hidden_states(tiny_whisper, speech_reference):
    wav, reference = speech_reference
    features = extract_features(tiny_whisper, wav)
    assert features.states.shape == (len(wav) * 50 // 16000, 5, 384) and features.num_samples == len(wav)
    assert features.states.dtype == torch.float32 and features.states.device.type == "cpu"
    torch.testing.assert_close(features.states, reference, rtol=0, atol=1e-4)


def test_last_state_is_post_layer_norm_whatever_the_hidden_states_convention(tiny_whisper, speech_reference):
    """transformers 5 ties hidden_states[-1] to the post-LN output only by default; a config can untie it."""
    wav, reference = speech_reference
    encoder = copy.deepcopy(tiny_whisper.encoder)
    encoder.config.tie_last_hidden_states = False
    untied = extract_features(with_encoder(tiny_whisper, encoder), wav)
    torch.testing.assert_close(untied.states, reference, rtol=0, atol=1e-4)


def test_states_keep_the_encoder_dtype(tiny_whisper, speech_reference):
    wav, reference = speech_reference
    bf16 = with_encoder(tiny_whisper, copy.deepcopy(tiny_whisper.encoder).bfloat16(), torch.bfloat16)
    states = extract_features(bf16, wav).states
    assert states.dtype == torch.bfloat16 and states.device.type == "cpu"
    assert F.cosine_similarity(states.float().flatten(), reference.flatten(), dim=0) > 0.99


def test_31_seconds_are_two_independent_segments(tiny_whisper, speech_reference):
    wav = np.resize(speech_reference[0], 31 * 16000)  # the sentence repeated
    features = extract_features(tiny_whisper, wav)
    assert features.states.shape == (1550, 5, 384)
    assert features.num_frames(25) == 775 and features.windows(25, 0, 775).shape == (775, 50, 384)
    # the last second is encoded on its own (zero-padded to 30 s), not as the tail of the first segment
    second = hand_states(tiny_whisper, wav[480000:])
    torch.testing.assert_close(features.states[1500:], second[:50], rtol=0, atol=1e-4)


def test_non_tiny_whisper_is_refused():
    other = SimpleNamespace(encoder=SimpleNamespace(config=SimpleNamespace(encoder_layers=6, d_model=512)))
    with pytest.raises(ModelFilesError, match="needs whisper-tiny"):
        extract_features(other, np.ones(16000, np.float32))


# ---------------------------------------------------------------------------------------- save/load


def test_save_load_round_trip(tmp_path):
    states = torch.randn(3 * 50, 5, 384, generator=torch.Generator().manual_seed(1))
    original = AudioFeatures(states, 3 * 16000 + 100)
    path = tmp_path / "features.safetensors"
    original.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["features.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {
            "schema": "musetalk-audio-features/1",
            "num_samples": "48100",
            "sample_rate": "16000",
        }
    loaded = AudioFeatures.load(path)
    assert loaded.num_samples == 48100 and loaded.states.dtype == torch.float16
    assert torch.equal(loaded.states, states.half())
    assert torch.equal(loaded.windows(25, 10, 20), AudioFeatures(states.half(), 48100).windows(25, 10, 20))


def test_load_refuses_damaged_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    AudioFeatures(torch.zeros(10, 5, 384), 16000).save(tmp_path / "short.safetensors")  # 50 rows expected
    save_file({"states": torch.zeros(50, 5, 384)}, tmp_path / "foreign.safetensors")  # no metadata
    for name in ("missing.safetensors", "junk.safetensors", "short.safetensors", "foreign.safetensors"):
        with pytest.raises(CacheError) as info:
            AudioFeatures.load(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)

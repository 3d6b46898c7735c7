"""Speech audio → Whisper-tiny encoder states → per-video-frame audio windows (docs/reference.md §4.1–4.2).

The request's audio is decoded and encoded once (``load_audio`` + ``extract_features``); each render
chunk then cuts the windows of its own frame range from the stored states (``AudioFeatures.windows``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from musetalk_ops.config import Limits
from musetalk_ops.errors import CacheError, InputError, ModelFilesError
from musetalk_ops.files import atomic_path

if TYPE_CHECKING:
    from musetalk_ops.models.whisper import WhisperEncoder

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # Whisper encoder states per second of audio (one per 320 samples)
SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # Whisper's fixed 30 s input; segments are encoded independently
CONTEXT = 2  # video frames of audio context on each side of a frame
WINDOW = 2 * (2 * CONTEXT + 1)  # encoder states per frame window (10)
NUM_STATES = 5  # embedding output + outputs of encoder layers 0–2 + layer_norm(output of layer 3)
STATE_DIM = 384
FEATURES_SCHEMA = "musetalk-audio-features/1"
SOUNDFILE_TYPES = (".wav", ".flac", ".ogg", ".mp3")  # what librosa (the official loader) reads via soundfile
AUDIO_TYPES = (*SOUNDFILE_TYPES, ".m4a", ".aac")
SILENCE_PEAK = 1e-4  # −80 dBFS: below this the whole file carries no speech


def load_audio(path: str | os.PathLike, limits: Limits | None = None) -> np.ndarray:
    """Decode ``path`` to float32 mono 16 kHz exactly as ``librosa.load(path, sr=16000)`` does.

    Channel mean, then soxr "HQ" resampling to ``ceil(n · 16000 / rate)`` samples. Files soundfile
    cannot read (M4A/AAC) are decoded with PyAV. The length limit is checked from the header before
    decoding and again while decoding, so an over-long file is refused after at most the limit's worth.
    """
    path = Path(path)
    limits = limits or Limits.from_env()
    if not path.is_file():
        raise InputError(f"no such audio file: {path}")
    suffix = path.suffix.lower()
    if suffix not in AUDIO_TYPES:
        raise InputError(
            f"{path}: unsupported audio type {suffix or '(no extension)'}; accepted: {', '.join(AUDIO_TYPES)}"
        )
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the audio file is empty (0 bytes)")
    decoded = _read_soundfile(path, limits) if suffix in SOUNDFILE_TYPES else None
    samples, rate = decoded or _read_pyav(path, limits)
    if samples.ndim > 1:
        samples = np.mean(samples, axis=0)
    if samples.size == 0:
        raise InputError(f"{path}: the file contains no audio samples")
    if not np.isfinite(samples).all():
        raise InputError(f"{path}: the audio contains invalid (NaN or infinite) samples")
    if np.abs(samples).max() < SILENCE_PEAK:
        raise InputError(f"{path}: the audio is silent")
    return _resample(samples, rate)


def _read_soundfile(path: Path, limits: Limits) -> tuple[np.ndarray, int] | None:
    """(samples [n] or [channels, n], rate), or None when libsndfile does not know the format."""
    try:
        handle = sf.SoundFile(path)
    except sf.SoundFileRuntimeError:
        return None
    with handle:
        if 0 < handle.frames < 2**62:  # libsndfile reports a huge sentinel when the length is unknown
            _check_seconds(path, handle.frames / handle.samplerate, limits)
        cap = math.floor(limits.max_audio_seconds * handle.samplerate)
        try:
            samples = handle.read(frames=cap + 1, dtype="float32", always_2d=False).T
        except sf.SoundFileRuntimeError:
            raise InputError(f"{path}: the audio data is corrupt") from None
    if samples.shape[-1] > cap:
        _refuse_long(path, limits)
    return samples, handle.samplerate


def _read_pyav(path: Path, limits: Limits) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg (edit lists / encoder delay applied by libavformat)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path}: the file has no audio track")
            if container.duration is not None:
                _check_seconds(path, container.duration / av.time_base, limits)
            stream = container.streams.audio[0]
            chunks, total, rate = [], 0, 0
            for frame in _planar_float_frames(container, stream):
                rate = rate or frame.rate
                chunks.append(frame.to_ndarray())
                total += frame.samples
                if total > limits.max_audio_seconds * rate:
                    _refuse_long(path, limits)
    except (av.FFmpegError, ValueError):  # ValueError: PyAV's own checks (e.g. a format change mid-stream)
        raise InputError(f"{path}: not a readable audio file (corrupt or not audio)") from None
    if not chunks:
        raise InputError(f"{path}: the file contains no audio samples")
    samples = np.concatenate(chunks, axis=1)
    return (samples[0] if len(samples) == 1 else samples), rate


def _planar_float_frames(container: av.container.InputContainer, stream: av.AudioStream):
    """Decoded frames converted to float32 planar at their own rate and layout (int → x / 2^(bits−1))."""
    resampler = av.AudioResampler(format="fltp")
    for frame in container.decode(stream):
        yield from resampler.resample(frame)
    yield from resampler.resample(None)


def _check_seconds(path: Path, seconds: float, limits: Limits) -> None:
    if seconds > limits.max_audio_seconds:
        raise InputError(
            f"{path}: the audio is {seconds:.1f} s long, over the {limits.max_audio_seconds:g} s limit "
            "(raise MUSETALK_MAX_AUDIO_SECONDS)"
        )


def _refuse_long(path: Path, limits: Limits) -> None:
    raise InputError(
        f"{path}: the audio is longer than the {limits.max_audio_seconds:g} s limit "
        "(raise MUSETALK_MAX_AUDIO_SECONDS)"
    )


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """librosa.resample(res_type="soxr_hq") including its length rule (same float formula, for parity)."""
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    size = int(np.ceil(samples.shape[-1] * (SAMPLE_RATE / rate)))
    out = soxr.resample(samples, rate, SAMPLE_RATE, quality="soxr_hq")[:size]
    return np.pad(out, (0, size - len(out))).astype(np.float32, copy=False)


def _exact_fps(fps: float | Fraction) -> Fraction:
    """The frame rate as an exact fraction (29.97 → 2997/100, float(30000/1001) → 30000/1001).

    Frame counts and window starts are integer arithmetic on this fraction, so ``8.0 s × 25`` is 200
    frames however the rate was written; a float product could land just below an integer.
    """
    if isinstance(fps, Fraction):
        exact = fps
    else:
        value = float(fps)
        exact = Fraction(value).limit_denominator(1_000_000) if math.isfinite(value) else Fraction(0)
    if exact <= 0:
        raise InputError(f"fps must be a positive number, got {fps!r}")
    return exact


@dataclass
class AudioFeatures:
    """Stacked Whisper encoder states of one audio file: ``states`` [F, 5, 384], F = ⌊L / 320⌋."""

    states: torch.Tensor
    num_samples: int

    @property
    def duration(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def num_frames(self, fps: float | Fraction) -> int:
        """Video frames the audio covers: ⌊seconds × fps⌋ with the true rate.

        The official code truncates fps to an integer first (29.97 → 29), which leaves the video ~3 %
        shorter than the audio and drifts the lips; we deliberately use the real rate.
        """
        rate = _exact_fps(fps)
        return self.num_samples * rate.numerator // (SAMPLE_RATE * rate.denominator)

    def windows(self, fps: float | Fraction, start: int, stop: int) -> torch.Tensor:
        """Audio tokens of frames [start, stop): [stop − start, 50, 384], token = 5·t + layer.

        Official indexing (docs/reference.md §4.1 steps 5–6): with m = 50/fps and pad = ⌈m⌉, frame i takes
        rows [⌊i·m⌋ − 2·pad, ⌊i·m⌋ − 2·pad + 10) of the states, rows outside [0, F) being zeros.
        Identical to the official windows for integer rates where its float ⌊i·m⌋ is exact (24, 25,
        30, 50, 60 …; not e.g. 29, where 145·(50/29) rounds below 250). Where the official code
        indexes past its right padding and aborts (the last frames at fps ≥ 50) the missing rows are
        zeros. Positional encoding is not added.
        """
        rate = _exact_fps(fps)
        if not 0 <= start <= stop <= self.num_frames(rate):
            raise ValueError(f"frame range [{start}, {stop}) is outside [0, {self.num_frames(rate)})")
        step_num, step_den = FEATURE_RATE * rate.denominator, rate.numerator  # m = step_num / step_den
        left = CONTEXT * -(-step_num // step_den)
        lo = start * step_num // step_den - left  # first row needed (may be negative: zero padding)
        span = (stop - start) * step_num // step_den + 1 + WINDOW  # bound on the rows the range needs
        src_lo = min(max(lo, 0), len(self.states))
        src_hi = max(min(lo + span, len(self.states)), src_lo)
        local = F.pad(self.states[src_lo:src_hi], (0, 0, 0, 0, src_lo - lo, lo + span - src_hi))
        frames = torch.arange(start, stop, device=local.device)
        first = frames * step_num // step_den - left - lo
        rows = first[:, None] + torch.arange(WINDOW, device=local.device)
        return local[rows].reshape(stop - start, WINDOW * NUM_STATES, self.states.shape[-1])

    def save(self, path: str | os.PathLike) -> None:
        """Write fp16 states + metadata as safetensors, atomically (temp file, then rename)."""
        path = Path(path)
        metadata = {
            "schema": FEATURES_SCHEMA,
            "num_samples": str(self.num_samples),
            "sample_rate": str(SAMPLE_RATE),
        }
        with atomic_path(path) as tmp:
            save_file({"states": self.states.to(torch.float16).contiguous()}, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AudioFeatures:
        """Read a file written by ``save``; anything else is a CacheError naming the file."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                states = handle.get_tensor("states")
        except (OSError, SafetensorError):
            raise CacheError(f"{path}: missing or unreadable audio features file") from None
        if metadata.get("schema") != FEATURES_SCHEMA or metadata.get("sample_rate") != str(SAMPLE_RATE):
            raise CacheError(f"{path}: not a {FEATURES_SCHEMA} file")
        num_samples = int(metadata["num_samples"]) if metadata.get("num_samples", "").isdigit() else -1
        expected = (num_samples * FEATURE_RATE // SAMPLE_RATE, NUM_STATES, STATE_DIM)
        if num_samples < 0 or tuple(states.shape) != expected:
            raise CacheError(f"{path}: damaged audio features (expected states of shape {list(expected)})")
        return cls(states, num_samples)


def extract_features(whisper: WhisperEncoder, wav: np.ndarray) -> AudioFeatures:
    """Whisper-tiny states of a 16 kHz waveform, segmented exactly like the official code.

    Each 30 s segment (the last one shorter) gets its own log-mel (zero-padded to 30 s, normalised per
    segment) and encoder pass; the five states are the embedding output, the outputs of layers 0–2
    and ``layer_norm(output of layer 3)``. The last state is taken from ``last_hidden_state`` so that it
    is post-LayerNorm as in transformers 4.39 (which the official weights were used with), whatever
    the installed version's ``hidden_states`` convention. Rows past ⌊L / 320⌋ (padding) are dropped.
    States keep the encoder's dtype and are moved to the CPU.
    """
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"extract_features needs a non-empty 1-D waveform, got shape {wav.shape}")
    config = whisper.encoder.config
    if config.encoder_layers != NUM_STATES - 1 or config.d_model != STATE_DIM:
        raise ModelFilesError(
            f"the whisper encoder has {config.encoder_layers} layers of width {config.d_model}; "
            f"MuseTalk needs whisper-tiny ({NUM_STATES - 1} layers of width {STATE_DIM})"
        )
    segments = []
    with torch.inference_mode():
        for offset in range(0, len(wav), SEGMENT_SAMPLES):
            mel = whisper.feature_extractor(
                wav[offset : offset + SEGMENT_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features
            out = whisper.encoder(mel.to(whisper.device, whisper.dtype), output_hidden_states=True)
            hidden = (*out.hidden_states[: NUM_STATES - 1], out.last_hidden_state)
            segments.append(torch.stack(hidden, dim=2)[0].cpu())
    rows = len(wav) * FEATURE_RATE // SAMPLE_RATE
    return AudioFeatures(torch.cat(segments)[:rows], len(wav))


def positional_encoding(length: int = 50, d_model: int = STATE_DIM) -> torch.Tensor:
    """Sinusoidal table [1, length, d_model] (sin on even dims, cos on odd, base 10000), float32.

    Computed in float32 like the official ``PositionalEncoding`` buffer, so it matches it bit for bit
    (the float32 arguments differ from exact math by up to ~3e-6 at position 49).
    """
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inverse = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inverse)
    table[:, 1::2] = torch.cos(position * inverse)
    return table[None]


def add_positional_encoding(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, S, D] + table, added in the tokens' dtype/device (the official fp16 path casts it)."""
    table = positional_encoding(tokens.shape[1], tokens.shape[2])
    return tokens + table.to(device=tokens.device, dtype=tokens.dtype)

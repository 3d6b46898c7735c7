"""Configuration from environment variables (design.md); CLI flags and resource config override.

Every default lives here, once, so the CLI, the Dagster resources and the tests agree.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from musetalk_ops.errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def models_dir(override: str | os.PathLike | None = None) -> Path:
    """Official-layout weights directory: flag, else ``$MUSETALK_MODELS``, else ``./models``."""
    return Path(override or os.environ.get("MUSETALK_MODELS") or "models")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Writable cache (fp16 weights, hashes): flag, else ``$MUSETALK_CACHE``, else ``~/.cache/musetalk``."""
    return Path(override or os.environ.get("MUSETALK_CACHE") or Path.home() / ".cache" / "musetalk")


def store_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of the local-folder object store: flag, else ``$MUSETALK_STORE``, else ``./.musetalk/store``."""
    return Path(override or os.environ.get("MUSETALK_STORE") or Path(".musetalk") / "store")


def resolve_device(name: str | None = None) -> torch.device:
    """``cuda`` when available unless told otherwise; asking for CUDA without one is an input error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """float16 on CUDA, float32 on the CPU, unless a dtype is named."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"${name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Limits:
    """Input limits that protect the workers; each can be raised by an environment variable."""

    max_audio_seconds: float = 600.0  # MUSETALK_MAX_AUDIO_SECONDS
    max_template_seconds: float = 120.0  # MUSETALK_MAX_TEMPLATE_SECONDS
    max_template_pixels: int = 4096 * 4096  # MUSETALK_MAX_TEMPLATE_PIXELS
    min_face_pixels: int = 64  # MUSETALK_MIN_FACE_PIXELS
    max_upload_bytes: int = 200 * 1024 * 1024  # MUSETALK_MAX_UPLOAD_BYTES

    @classmethod
    def from_env(cls) -> "Limits":
        d = cls()
        return cls(
            max_audio_seconds=_env_float("MUSETALK_MAX_AUDIO_SECONDS", d.max_audio_seconds),
            max_template_seconds=_env_float("MUSETALK_MAX_TEMPLATE_SECONDS", d.max_template_seconds),
            max_template_pixels=int(_env_float("MUSETALK_MAX_TEMPLATE_PIXELS", d.max_template_pixels)),
            min_face_pixels=int(_env_float("MUSETALK_MIN_FACE_PIXELS", d.min_face_pixels)),
            max_upload_bytes=int(_env_float("MUSETALK_MAX_UPLOAD_BYTES", d.max_upload_bytes)),
        )

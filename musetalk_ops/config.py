"""Configuration from environment variables (docs/architecture.md §6); CLI flags and resource config override.

Every default lives here, once, so the CLI, the Dagster resources and the tests agree. Importing it
does not import torch: the Dagster code location reads the same configuration.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from musetalk_ops.errors import InputError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def models_dir(override: str | os.PathLike | None = None) -> Path:
    """Official-layout weights directory: flag, else ``$MUSETALK_MODELS``, else ``./models``."""
    return Path(override or os.environ.get("MUSETALK_MODELS") or "models")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Writable cache (fp16 weights, hashes): flag, else ``$MUSETALK_CACHE``, else ``~/.cache/musetalk``."""
    return Path(override or os.environ.get("MUSETALK_CACHE") or Path.home() / ".cache" / "musetalk")


def store_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of the local-folder object store: flag, else ``$MUSETALK_STORE``, else ``./.musetalk/store``."""
    return Path(override or os.environ.get("MUSETALK_STORE") or Path(".musetalk") / "store")


def resolve_device(name: str | None = None) -> "torch.device":
    """``cuda`` when available unless told otherwise; asking for CUDA without one is an input error."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None


def resolve_dtype(name: str | None, device: "torch.device") -> "torch.dtype":
    """float16 on CUDA, float32 on the CPU, unless a dtype is named."""
    if name is None:
        name = "float16" if device.type == "cuda" else "float32"
    return torch_dtype(name)


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of one of ``DTYPE_NAMES``."""
    if name not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def dtype_name(dtype: "torch.dtype") -> str:
    """The name in ``DTYPE_NAMES`` of a torch dtype."""
    return str(dtype).removeprefix("torch.")


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

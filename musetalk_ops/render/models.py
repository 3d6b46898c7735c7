"""The models a render needs, loaded once per process, and the audio features a request's chunks share."""

from functools import lru_cache
from pathlib import Path

import torch

from musetalk_ops.audio import AudioFeatures, extract_features, load_audio
from musetalk_ops.config import Limits, dtype_name, models_dir, resolve_device, resolve_dtype, torch_dtype
from musetalk_ops.models import Models, load_models
from musetalk_ops.render.settings import RenderSettings


@lru_cache(maxsize=4)
def _load_models_cached(
    root: Path, version: str, device: str, dtype: str, components: tuple[str, ...]
) -> Models:
    return load_models(
        root, version=version, device=torch.device(device), dtype=torch_dtype(dtype), components=components
    )


def load_render_models(
    settings: RenderSettings, version: str = "v15", components: tuple[str, ...] = ("unet", "vae", "whisper")
) -> Models:
    """Models for ``settings``, loaded once per process (in-process runs and warm workers reuse them)."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    root = models_dir(settings.models_root).resolve()
    return _load_models_cached(
        root, settings.version or version, str(device), dtype_name(dtype), tuple(components)
    )


def compute_features(models: Models, audio_path: Path, limits: Limits | None = None) -> AudioFeatures:
    """Whisper features of a whole request, computed once and shared by every chunk."""
    return extract_features(models.whisper, load_audio(audio_path, limits))

"""Official MuseTalk weights: layout checks, loaders, demo weights, download and conversion.

``load_models`` checks every needed file first (one clear error before anything heavy loads), then
loads each component and casts it once, after loading, to the requested device and dtype.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from musetalk_ops.models.bisenet import BiSeNet, load_bisenet
from musetalk_ops.models.layout import (
    COMPONENTS,
    ModelLayout,
    check_models,
    weights_fingerprint,
    weights_kind,
)
from musetalk_ops.models.unet import load_unet
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae import load_vae
from musetalk_ops.models.vae_model import VAE

if TYPE_CHECKING:  # transformers costs seconds to import; a render step that gets features never needs it
    from musetalk_ops.models.whisper import WhisperEncoder


@dataclass
class Models:
    """Loaded components (None where not asked for) and what they are.

    ``fingerprint`` names the VAE and BiSeNet files, which template caches depend on, so a cache made
    with other weights can be recognised; it is ``"demo"`` for demo sets.
    """

    unet: UNet | None
    vae: VAE | None
    whisper: "WhisperEncoder | None"
    bisenet: BiSeNet | None
    device: torch.device
    dtype: torch.dtype
    version: str
    weights: str
    fingerprint: str


def load_models(
    root: str | os.PathLike,
    *,
    version: str = "v15",
    device: torch.device | str,
    dtype: torch.dtype,
    components: Iterable[str] = ("unet", "vae", "whisper"),
    cache: str | os.PathLike | None = None,
) -> Models:
    """Load ``components`` from the official layout under ``root``; the VAE and BiSeNet files must exist
    even when not loaded, since the fingerprint names them."""
    components = tuple(components)
    check_models(root, version, dict.fromkeys((*components, "vae", "bisenet")))
    device = torch.device(device)
    fingerprint = weights_fingerprint(root, ModelLayout(root).template_files(), cache)
    loaders = {
        "unet": lambda: load_unet(root, version, device, dtype, cache=cache),
        "vae": lambda: load_vae(root, device, dtype),
        "whisper": lambda: _load_whisper(root, device, dtype),
        "bisenet": lambda: load_bisenet(root, device, dtype),
    }
    loaded = {name: loaders[name]() if name in components else None for name in COMPONENTS}
    return Models(
        **loaded,
        device=device,
        dtype=dtype,
        version=version,
        weights=weights_kind(root),
        fingerprint=fingerprint,
    )


def _load_whisper(root: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> "WhisperEncoder":
    from musetalk_ops.models.whisper import load_whisper

    return load_whisper(root, device, dtype)

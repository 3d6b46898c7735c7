"""Official MuseTalk weights: layout checks, loaders, demo weights, download and conversion.

``load_models`` checks every needed file first (one clear error before anything heavy loads), then
loads each component and casts it once, after loading, to the requested device and dtype.

The models it returns are made for inference: every ×2 upsampler of the UNet and the VAE decoder is
folded into phase convolutions (``layers.Upsample2D.fold``), the same function with less than half the
multiply-adds of the upsampling convolutions (timings and the ±1-level effect on faces: bench/RESULTS.md).
The single loaders (``load_unet``, ``load_vae``) return the official modules as stored.
"""

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from musetalk_ops.models.bisenet import BiSeNet, load_bisenet
from musetalk_ops.models.layers import fold_upsampling
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
        "unet": lambda: fold_upsampling(load_unet(root, version, device, dtype, cache=cache)),
        "vae": lambda: fold_upsampling(load_vae(root, device, dtype)),
        "whisper": lambda: _load_whisper(root, device, dtype),
        "bisenet": lambda: load_bisenet(root, device, dtype),
    }
    warm = _warm_up_libraries(device, dtype) if {"unet", "vae"} & set(components) else None
    loaded = {name: loaders[name]() if name in components else None for name in COMPONENTS}
    if warm is not None:
        warm.join()
    return Models(
        **loaded,
        device=device,
        dtype=dtype,
        version=version,
        weights=weights_kind(root),
        fingerprint=fingerprint,
    )


def _warm_up_libraries(device: torch.device, dtype: torch.dtype) -> threading.Thread | None:
    """On CUDA, start the one-off costs of a fresh process's first convolution, attention and matmul
    (library loading, cuDNN and cuBLAS set-up) on a side thread, so they overlap the weights' loading
    instead of delaying the first batch. None elsewhere."""
    if device.type != "cuda":
        return None

    def run() -> None:
        try:
            with torch.inference_mode(), torch.cuda.device(device):
                x = torch.zeros((1, 32, 8, 8), device=device, dtype=dtype)
                F.silu(F.group_norm(F.conv2d(x, torch.zeros((32, 32, 3, 3), device=device, dtype=dtype)), 8))
                q = torch.zeros((1, 8, 64, 40), device=device, dtype=dtype)
                F.scaled_dot_product_attention(q, q, q) @ torch.zeros((40, 40), device=device, dtype=dtype)
                torch.cuda.synchronize(device)
        except Exception:  # a device that fails here fails the loading too, with a clear error there
            pass

    thread = threading.Thread(target=run, name="musetalk-cuda-warm-up", daemon=True)
    thread.start()
    return thread


def _load_whisper(root: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> "WhisperEncoder":
    from musetalk_ops.models.whisper import load_whisper

    return load_whisper(root, device, dtype)

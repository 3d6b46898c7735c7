"""SD VAE (``sd-vae-ft-mse``): crops → 8-channel UNet latents, UNet output → faces (docs/reference.md §3).

Encoding uses the posterior **mean**: the official code samples (``latent_dist.sample()``), which makes
template latents random; the mean is what training used and keeps caches reproducible (docs/reference.md P5).
"""

import os
from collections.abc import Callable

import numpy as np
import torch

from musetalk_ops.errors import ModelFilesError
from musetalk_ops.models.layout import (
    ModelLayout,
    check_models,
    load_strict,
    read_json,
    read_state_dict,
    ready,
)
from musetalk_ops.models.vae_model import VAE, VAEConfig, rename_deprecated_attention

OFFICIAL_VAE_CONFIG = {  # stabilityai/sd-vae-ft-mse config.json (the official sd-vae/)
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Frames per VAE decode call: the decode gains nothing from larger calls while its activations set a
# render's GPU memory, so larger batches decode in slices of this many (bench/RESULTS.md).
DECODE_BATCH = 32
VAE_SCALE = 0.18215  # SD 1.x's scaling_factor; VAEConfig rejects a config.json with another
CROP = 256
MASK_FROM_ROW = CROP // 2  # rows 128..255 (the mouth half) are hidden from the masked latent


def build_vae(config: dict, path: os.PathLike | str) -> VAE:
    """The VAE of a ``config.json`` dict (random weights; build on the meta device to load into)."""
    try:
        return VAE(VAEConfig.from_json(config))
    except (TypeError, ValueError) as e:
        raise ModelFilesError(f"{path} is not a supported VAE config: {e}") from None


def load_vae(root: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> VAE:
    """Strictly load ``sd-vae/`` (config.json and its weights), as the UNet: meta-device model, the tensors
    adopted, then cast. Old attention names (sd-vae-ft-mse's) are renamed first, as diffusers does."""
    check_models(root, components=("vae",))
    layout = ModelLayout(root)
    with torch.device("meta"):
        vae = build_vae(read_json(layout.vae_config), layout.vae_config)
    state = rename_deprecated_attention(vae, read_state_dict(layout.vae_weights))
    load_strict(vae, state, layout.vae_weights)
    return ready(vae, device, dtype)


def _vae_input(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """[2B,3,256,256] contiguous NCHW in [-1,1], as the official code builds it: the masked crops (lower
    half exactly -1), then the full crops."""
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().to(device).float() / 255
    masked = x.clone()
    masked[:, :, MASK_FROM_ROW:, :] = 0  # zeroed before normalising, so it becomes -1
    return (torch.cat([masked, x]) - 0.5) / 0.5


@torch.inference_mode()
def encode_crops(vae: VAE, crops: np.ndarray) -> torch.Tensor:
    """RGB uint8 [B,256,256,3] → float32 [B,8,32,32]: masked latents (0–3) ‖ reference latents (4–7).

    Each image is encoded alone, as the official code does: on the CPU, torch picks its convolution and
    channels-last group-norm algorithms (diffusers' mid-block attention leaves that layout) by batch
    size, so only one image per call reproduces the official latents bit for bit.
    """
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (CROP, CROP, 3):
        raise ValueError(f"encode_crops wants uint8 [B,{CROP},{CROP},3], got {crops.dtype} {crops.shape}")
    x = _vae_input(crops, vae.device).to(vae.dtype)
    latents = torch.cat([vae.encode_mean(image[None]) for image in x]) * VAE_SCALE
    masked, full = latents.float().chunk(2)
    return torch.cat([masked, full], dim=1)


@torch.inference_mode()
def decode_latents(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """[B,4,32,32] → RGB uint8 [B,256,256,3] on the VAE's device (÷0.18215, decode, clamp, ×255, round)."""
    images = vae.decode((latents / VAE_SCALE).to(device=vae.device, dtype=vae.dtype))
    images = (images / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


def decode_slices(n: int) -> tuple[int, int]:
    """(calls, frames per call) that decode a batch of ``n`` latents: as few equal slices of at most
    ``DECODE_BATCH`` as hold them (64 → 2 × 32, 48 → 2 × 24, 20 → 1 × 20)."""
    calls = -(-n // DECODE_BATCH)
    return calls, -(-n // calls)


def decode_sliced(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """``decode`` ([b,4,32,32] → [b,256,256,3]) of ``latents`` in ``decode_slices``' slices. The last
    slice is padded with zeros to the others' size, so every call has one shape: a compiled decode
    exists for one, and a padded frame costs less than a second shape."""
    n = len(latents)
    calls, size = decode_slices(n)
    if calls == 1:
        return decode(latents)
    padded = torch.nn.functional.pad(latents, (0, 0, 0, 0, 0, 0, 0, calls * size - n))
    return torch.cat([decode(part) for part in padded.split(size)])[:n]

"""SD VAE (``sd-vae-ft-mse``): crops → 8-channel UNet latents, UNet output → faces (reference §3).

Encoding uses the posterior **mean**: the official code samples (``latent_dist.sample()``), which makes
template latents random; the mean is what training used and keeps caches reproducible (P5).
"""

import os

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

from musetalk_ops.errors import ModelFilesError
from musetalk_ops.models.layout import ModelLayout, check_models, ready, state_dict_mismatch

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

VAE_SCALE = 0.18215
CROP = 256
MASK_FROM_ROW = CROP // 2  # rows 128..255 (the mouth half) are hidden from the masked latent


def load_vae(root: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` on ``sd-vae/``, local files only; any key difference fails."""
    check_models(root, components=("vae",))
    layout = ModelLayout(root)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # we report key problems ourselves, in one line
    try:
        vae, info = AutoencoderKL.from_pretrained(
            str(layout.vae_dir), local_files_only=True, use_safetensors=False, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip() and "You may consider" not in s]
        raise ModelFilesError(f"cannot load the VAE from {layout.vae_dir}: {' '.join(lines[-2:])}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    missing, unexpected = dict.fromkeys(info["missing_keys"], ()), dict.fromkeys(info["unexpected_keys"], ())
    problem = state_dict_mismatch(missing, unexpected)  # (shape mismatches raise inside from_pretrained)
    if problem:
        raise ModelFilesError(
            f"{layout.vae_weights} does not fit {layout.vae_config}: {problem} (replace the files)"
        )
    return ready(vae, device, dtype)


def _vae_input(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """[2B,3,256,256] in [-1,1]: the masked crops (lower half exactly -1), then the full crops."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float() / 255
    masked = x.clone()
    masked[:, :, MASK_FROM_ROW:, :] = 0  # zeroed before normalising, so it becomes -1
    return (torch.cat([masked, x]) - 0.5) / 0.5


@torch.inference_mode()
def encode_crops(vae: AutoencoderKL, crops: np.ndarray) -> torch.Tensor:
    """RGB uint8 [B,256,256,3] → float32 [B,8,32,32]: masked latents (0–3) ‖ reference latents (4–7)."""
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (CROP, CROP, 3):
        raise ValueError(f"encode_crops wants uint8 [B,{CROP},{CROP},3], got {crops.dtype} {crops.shape}")
    x = _vae_input(crops, vae.device).to(vae.dtype)
    latents = vae.encode(x).latent_dist.mean * VAE_SCALE
    masked, full = latents.float().chunk(2)
    return torch.cat([masked, full], dim=1)


@torch.inference_mode()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """[B,4,32,32] → RGB uint8 [B,256,256,3] on the VAE's device (÷0.18215, decode, clamp, ×255, round)."""
    images = vae.decode((latents / VAE_SCALE).to(device=vae.device, dtype=vae.dtype)).sample
    images = (images / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)

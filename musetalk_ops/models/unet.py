"""MuseTalk UNet (``unet_model.UNet``) run once at timestep 0 (docs/reference.md §1.2, P10).

The model is built on the meta device and adopts the loaded tensors (``assign``), so loading costs one
read of the weights and no random initialisation; the cast to the requested dtype comes after loading,
so ``float32`` computes in fp32 whatever precision the file stores.
"""

import os

import torch

from musetalk_ops.errors import ModelFilesError
from musetalk_ops.models.convert import load_converted
from musetalk_ops.models.layout import (
    ModelLayout,
    check_models,
    load_strict,
    read_json,
    read_state_dict,
    ready,
)
from musetalk_ops.models.unet_model import UNet, UNetConfig

# The official ``musetalk.json`` (docs/reference.md §1.2); ``attention_head_dim`` 8 is diffusers' legacy
# name for 8 heads per attention layer.
OFFICIAL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def build_unet(config: dict, path: os.PathLike | str) -> UNet:
    """The UNet of a ``musetalk.json`` dict (random weights; build on the meta device to load into)."""
    try:
        return UNet(UNetConfig.from_json(config))
    except (TypeError, ValueError) as e:
        raise ModelFilesError(f"{path} is not a supported UNet config: {e}") from None


def load_unet(
    root: str | os.PathLike,
    version: str,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    cache: str | os.PathLike | None = None,
) -> UNet:
    """Strictly load the official UNet; fp16/bf16 use a ``musetalk models convert`` copy when one is valid."""
    check_models(root, version, components=("unet",))
    layout = ModelLayout(root)
    config_path = layout.unet_config(version)
    with torch.device("meta"):
        unet = build_unet(read_json(config_path), config_path)
    source = layout.unet_weights(version)
    found = load_converted(source, dtype, device, cache)
    state, path = found if found else (read_state_dict(source), source)
    load_strict(unet, state, path)
    return ready(unet, device, dtype)


@torch.inference_mode()
def unet_predict(unet: UNet, latents: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
    """[B,8,32,32] latents, [B,50,384] tokens → [B,4,32,32] in the UNet's dtype; timestep 0 (int64)."""
    device, dtype = unet.device, unet.dtype
    timestep = torch.tensor([0], dtype=torch.int64, device=device)
    return unet(latents.to(device=device, dtype=dtype), timestep, audio_tokens.to(device=device, dtype=dtype))

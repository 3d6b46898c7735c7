"""The SD VAE: diffusers' ``AutoencoderKL`` for the configuration family of ``sd-vae-ft-mse``.

Encoder and decoder are stacks of ResNet blocks with a stride-2 conv (encoder) or ×2 upsample
(decoder) between resolutions and, at the lowest resolution, a mid block with one single-head
self-attention over the pixels. Every norm uses eps 1e-6 (diffusers' fixed value for these models).
Module and parameter names are diffusers', so its checkpoints load strictly; 2022 checkpoints (like the
official ``sd-vae-ft-mse``) use older attention names, which ``rename_deprecated_attention`` maps.
"""

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from musetalk_ops.models.layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    Net,
    NetConfig,
    ResnetBlock2D,
    Upsample2D,
)

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig(NetConfig):
    """The ``AutoencoderKL`` arguments we implement, with diffusers' names and defaults.

    ``scaling_factor`` must stay 0.18215 (SD 1.x's), the latent scale MuseTalk was trained with.
    ``sample_size`` is informational.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32

    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "act_fn": "silu",
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for key, allowed in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, key)
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries for {n} block_out_channels")
            if set(types) != {allowed}:
                raise ValueError(f"{key} = {list(types)} is not supported (only {allowed})")


def _resnet(in_channels: int, out_channels: int, groups: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, groups=groups, eps=EPS, temb_channels=None)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the H·W positions of a feature map: GroupNorm → attention → added
    to the input (diffusers' ``Attention`` as the VAE mid block configures it)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        return super().forward(tokens).transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: ResNet block → self-attention → ResNet block."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        first = _resnet(channels, channels, groups)  # built in diffusers' order: resnet, attention, resnet
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([first, _resnet(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock(nn.Module):
    """``DownEncoderBlock2D``: ResNet blocks, then an optional stride-2 conv (asymmetric padding)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, *, downsample: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock(nn.Module):
    """``UpDecoderBlock2D``: ResNet blocks, then an optional ×2 upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, *, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """Images [B, in, H, W] → posterior moments before ``quant_conv`` [B, 2·latent, H/f, W/f]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, groups, last = (
            config.block_out_channels,
            config.norm_num_groups,
            len(config.block_out_channels) - 1,
        )
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, downsample=i < last
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] (after ``post_quant_conv``) → images [B, out, h·f, w·f]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, groups, last = (
            config.block_out_channels,
            config.norm_num_groups,
            len(config.block_out_channels) - 1,
        )
        up_channels = channels[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        self.mid_block = MidBlock(channels[-1], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                up_channels[max(i - 1, 0)],
                up_channels[i],
                config.layers_per_block + 1,
                groups,
                upsample=i < last,
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = GroupNorm(groups, channels[0], eps=EPS)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(Net):
    """``AutoencoderKL`` of ``config``, reduced to what inference needs: the posterior mean and decoding."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → the mean of the latent posterior (the first half of its moments), unscaled."""
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents → images, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))


# Old attention parameter names → today's, as diffusers' ``_fix_state_dict_keys_on_load`` renames them.
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention(vae: VAE, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the old names of ``vae``'s mid-block attention parameters (``query``, ``key``,
    ``value``, ``proj_attn``) renamed; every other key, and the order, kept."""
    attentions = {name for name, module in vae.named_modules() if isinstance(module, SpatialSelfAttention)}
    renamed = {}
    for key, value in state.items():
        path, _, leaf = key.rpartition(".")  # "encoder.mid_block.attentions.0.query", "weight"
        parent, _, name = path.rpartition(".")
        if parent in attentions and name in DEPRECATED_ATTENTION_NAMES:
            key = f"{parent}.{DEPRECATED_ATTENTION_NAMES[name]}.{leaf}"
        renamed[key] = value
    return renamed

"""The MuseTalk UNet: diffusers' ``UNet2DConditionModel`` for the one configuration family MuseTalk uses.

That family is Stable Diffusion 1.x's layout: cross-attention down blocks and a plain last one, a
cross-attention mid block, a plain first up block and cross-attention up blocks, each attention a
``Transformer2DModel`` with 1×1-conv projections and one ``BasicTransformerBlock`` (self-attention,
cross-attention to the conditioning tokens, GEGLU feed-forward). Widths, block count, which blocks
attend, layers per block, heads, norm groups and token width may vary; ``UNetConfig.from_json``
rejects anything else. Module and parameter names are diffusers', so its checkpoints load strictly, and
the modules are built in diffusers' order, so a seeded random initialisation gives the same weights.
"""

import dataclasses
from collections import OrderedDict
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
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
)

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclasses.dataclass(frozen=True)
class UNetConfig(NetConfig):
    """The ``UNet2DConditionModel`` arguments we implement, with diffusers' names and defaults.

    ``attention_head_dim`` is diffusers' legacy name for the number of heads of every attention layer
    (each head is ``channels // attention_head_dim`` wide). ``sample_size`` is informational.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    attention_head_dim: int = 8

    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "only_cross_attention": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": 0.0,
        "act_fn": "silu",
        "transformer_layers_per_block": 1,
        "reverse_transformer_layers_per_block": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "num_attention_heads": None,
        "dual_cross_attention": False,
        "use_linear_projection": False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "num_class_embeds": None,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
    }

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for key, allowed in (
            ("down_block_types", {CROSS_DOWN, PLAIN_DOWN}),
            ("up_block_types", {CROSS_UP, PLAIN_UP}),
        ):
            types = getattr(self, key)
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries for {n} block_out_channels")
            if not set(types) <= allowed:
                raise ValueError(
                    f"{key} = {list(types)} is not supported (only {' and '.join(sorted(allowed))})"
                )
        for key in ("layers_per_block", "attention_head_dim"):
            if not isinstance(getattr(self, key), int):
                raise ValueError(f"{key} = {getattr(self, key)!r} is not supported (one int for all blocks)")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


def _resnet(in_channels: int, out_channels: int, config: UNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        temb_channels=config.time_embed_dim,
    )


class GEGLU(nn.Module):
    """One projection to twice the width, split into values and GELU gates."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, gates = self.proj(x).chunk(2, dim=-1)
        return values * F.gelu(gates)


class FeedForward(nn.Module):
    """GEGLU to 4× the width, then back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Names "0" and "2" are diffusers' (its "1" is an inference no-op dropout).
        self.net = nn.Sequential(OrderedDict([("0", GEGLU(dim, dim * 4)), ("2", nn.Linear(dim * 4, dim))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock``: pre-LayerNorm self-attention, cross-attention to the
    conditioning tokens and feed-forward, each added to its input. LayerNorm eps is diffusers' fixed 1e-5."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim // heads, cross_attention_dim=cross_attention_dim
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` on feature maps with conv projections: GroupNorm (eps 1e-6) →
    1×1 conv → one transformer block over the H·W positions → 1×1 conv, added to the input."""

    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.norm = GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, config.attention_head_dim, config.cross_attention_dim)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()) + x


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (``attention``) or ``DownBlock2D``: ResNet blocks, each followed by a
    transformer when ``attention``, then an optional stride-2 downsample.

    Returns the features and every intermediate output: the skip connections of the up path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        config: UNetConfig,
        *,
        attention: bool,
        add_downsample: bool,
    ) -> None:
        super().__init__()
        resnets, attentions = [], []
        for i in range(config.layers_per_block):
            resnets.append(_resnet(in_channels if i == 0 else out_channels, out_channels, config))
            if attention:
                attentions.append(Transformer2D(out_channels, config))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=1)]) if add_downsample else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: ResNet block → transformer → ResNet block."""

    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        first = _resnet(channels, channels, config)  # built in diffusers' order: resnet, transformer, resnet
        self.attentions = nn.ModuleList([Transformer2D(channels, config)])
        self.resnets = nn.ModuleList([first, _resnet(channels, channels, config)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (``attention``) or ``UpBlock2D``: ResNet blocks, each fed the features
    concatenated with one skip connection and followed by a transformer when ``attention``, then an
    optional ×2 upsample.

    ``prev_channels`` is the width coming from below, ``skip_channels`` that of the last skip this block
    takes (the output of the down block before its mirror); the other skips are ``out_channels`` wide.
    """

    def __init__(
        self,
        skip_channels: int,
        out_channels: int,
        prev_channels: int,
        config: UNetConfig,
        *,
        attention: bool,
        add_upsample: bool,
    ) -> None:
        super().__init__()
        num_layers = config.layers_per_block + 1
        resnets, attentions = [], []
        for i in range(num_layers):
            skip = skip_channels if i == num_layers - 1 else out_channels
            resnets.append(_resnet((prev_channels if i == 0 else out_channels) + skip, out_channels, config))
            if attention:
                attentions.append(Transformer2D(out_channels, config))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """``skips``: this block's skip connections in down-path order; the last is used first."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips), strict=True)):
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNet(Net):
    """``UNet2DConditionModel`` of ``config``: (sample, timestep, conditioning tokens) → output sample."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0])
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                channels[max(i - 1, 0)],
                channels[i],
                config,
                attention=kind == CROSS_DOWN,
                add_downsample=i < last,
            )
            for i, kind in enumerate(config.down_block_types)
        )
        self.mid_block = MidBlock(channels[-1], config)
        up_channels = channels[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(
                up_channels[min(i + 1, last)],
                up_channels[i],
                up_channels[max(i - 1, 0)],
                config,
                attention=kind == CROSS_UP,
                add_upsample=i < last,
            )
            for i, kind in enumerate(config.up_block_types)
        )
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """``sample`` [B, in, H, W] (H, W multiples of 2^(blocks − 1)); ``timestep`` one value or one per
        sample; ``encoder_hidden_states`` [B, tokens, cross_attention_dim] → [B, out, H, W]."""
        factor = 2 ** (len(self.up_blocks) - 1)
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(
                f"UNet input {tuple(sample.shape)}: height and width must be multiples of {factor}"
            )
        t = self.time_proj(timestep.reshape(-1).expand(sample.shape[0]))
        temb = self.time_embedding(t.to(sample.dtype))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            x = block(x, skips[-n:], temb, context)
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))

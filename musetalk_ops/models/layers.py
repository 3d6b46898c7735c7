"""Blocks shared by our UNet and VAE, written after the diffusers modules of the same names.

Only what the MuseTalk models use is implemented, in inference form (no dropout, no gradient
checkpointing). Parameter names are diffusers', so the official checkpoints load strictly. Forward
passes hold no data-dependent Python control flow and no host syncs, so they compile with
``torch.compile`` and capture into CUDA graphs.
"""

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ConfigT = TypeVar("ConfigT", bound="NetConfig")


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """A model config whose fields carry diffusers' names and defaults.

    ``DIFFUSERS_DEFAULTS`` lists the other arguments of the diffusers class, each with the one value this
    implementation supports (its diffusers default), so a ``config.json`` written by diffusers is accepted
    exactly when we compute what diffusers would.
    """

    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_json(cls: type[ConfigT], config: dict[str, Any]) -> ConfigT:
        """Build from a diffusers ``config.json`` dict; ``_``-prefixed bookkeeping keys are ignored.

        Raises ``ValueError`` naming the first key we do not implement.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in config.items():
            if key.startswith("_") or key in names:
                continue
            if key not in cls.DIFFUSERS_DEFAULTS:
                raise ValueError(f"unknown key {key!r}")
            default = cls.DIFFUSERS_DEFAULTS[key]
            if _freeze(value) != _freeze(default):
                raise ValueError(f"{key} = {value!r} is not supported (only {default!r} is implemented)")
        return cls(**{k: _freeze(v) for k, v in config.items() if k in names})


def _freeze(value: Any) -> Any:
    """Lists as tuples, so JSON values compare equal to (and hash like) the tuple defaults."""
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


class Net(nn.Module):
    """A model that reports where its weights are, so callers can place inputs (as diffusers' ModelMixin)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def group_norm_from_channel_moments(
    x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``F.group_norm`` computed from each channel's mean and variance over the positions, pooled per
    group: the group's variance is the mean of its channels' variances plus the variance of their means
    (exact, and as stable as one variance). Statistics in float32 at least, as ``F.group_norm`` on CUDA.
    """
    b, c = x.shape[0], x.shape[1]
    exact = torch.promote_types(x.dtype, torch.float32)
    var, mean = torch.var_mean(x.to(exact), dim=tuple(range(2, x.ndim)), correction=0)  # [B, C]
    mean, var = mean.view(b, groups, -1), var.view(b, groups, -1)
    group_mean = mean.mean(-1, keepdim=True)
    group_var = (var + (mean - group_mean).square()).mean(-1, keepdim=True)
    scale = torch.rsqrt(group_var + eps) * weight.to(exact).view(groups, -1)  # [B, G, C/G]
    shift = bias.to(exact).view(groups, -1) - group_mean * scale
    trailing = (1,) * (x.ndim - 2)
    return (x * scale.view(b, c, *trailing) + shift.view(b, c, *trailing)).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and result), which compiled code computes from per-channel
    moments (``group_norm_from_channel_moments``).

    Why: compiled convolutions leave feature maps channels-last, where a group's values are strided
    across pixels and per-channel moments read faster; uncompiled (eager, CUDA graphs, the CPU
    reference) torch's one fused kernel beats the several of that formula (bench/RESULTS.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # eager, graphs, reference: torch's fused kernel
            return super().forward(x)
        return group_norm_from_channel_moments(x, self.num_groups, self.weight, self.bias, self.eps)


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a shortcut (a 1×1 conv where the width changes).

    With ``temb_channels`` a projection of the SiLU'd time embedding is added to every channel between
    the two convolutions (diffusers' ``time_embedding_norm="default"``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, eps: float, temb_channels: int | None
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3×3 conv.

    ``padding=1`` pads every side (the UNet's ``downsample_padding``); ``padding=0`` pads only the right
    and bottom by one (the VAE encoder's asymmetric padding, from the original LDM code).
    """

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour ×2, then a 3×3 conv.

    ``fold`` computes the same function without the upsampled intermediate. Output row 2i+a reads input
    rows (i−1, i) for a = 0 and (i, i+1) for a = 1, each with the sum of the kernel rows that land on it;
    likewise for columns. So each of the four output phases (a, b) is a 2×2 convolution of the input:
    16 instead of 36 multiply-adds per output value and channel, and no 4× larger tensor written and
    read back. One 2×2 conv with 4× the outputs runs on the input padded by one; phase (a, b) is its
    output block 2a+b shifted by (a, b). Equal to the unfolded module up to float rounding (the
    kernel sums are rounded once to the weights' dtype).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv: nn.Conv2d | None = nn.Conv2d(channels, channels, 3, padding=1)
        self.phases: nn.Conv2d | None = None

    def fold(self) -> None:
        """Replace the 3×3 conv by the four phase kernels (once the weights are loaded)."""
        if self.conv is None:
            return
        w = self.conv.weight.detach().double()  # [out, in, 3, 3]
        pairs = (lambda k: (k[0], k[1] + k[2]), lambda k: (k[0] + k[1], k[2]))  # phase 0, phase 1
        kernels = []
        for rows in pairs:
            by_rows = torch.stack(rows(w.unbind(2)), 2)  # [out, in, 2, 3]
            kernels += [torch.stack(cols(by_rows.unbind(3)), 3) for cols in pairs]
        out_channels, in_channels = w.shape[:2]
        phases = nn.Conv2d(in_channels, 4 * out_channels, 2, device=w.device, dtype=self.conv.weight.dtype)
        phases.weight = nn.Parameter(torch.cat(kernels).to(self.conv.weight.dtype), requires_grad=False)
        phases.bias = nn.Parameter(self.conv.bias.detach().repeat(4), requires_grad=False)
        self.phases, self.conv = phases, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phases is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        b, _, h, w = x.shape
        out = self.phases(F.pad(x, (1, 1, 1, 1)))  # [B, 4·C, H + 1, W + 1]
        c = out.shape[1] // 4
        phases = [
            out[:, (2 * a + col) * c : (2 * a + col + 1) * c, a : a + h, col : col + w] for a, col in _PHASES
        ]
        # [B, C, a, col, H, W] → [B, C, H, a, W, col]: one pointwise kernel once compiled, where writes
        # into strided views of an empty tensor compile to four whole-tensor scatters
        y = torch.stack(phases, 2).unflatten(2, (2, 2))
        return y.permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def fold_upsampling(model: nn.Module) -> nn.Module:
    """``Upsample2D.fold`` for every upsampler of ``model`` (in place); returns ``model``."""
    for module in model.modules():
        if isinstance(module, Upsample2D):
            module.fold()
    return model


class Attention(nn.Module):
    """Multi-head attention of ``[B, N, query_dim]`` queries over ``context`` (itself when None).

    diffusers' ``Attention`` with its default ``AttnProcessor2_0``: linear q/k/v, PyTorch's
    ``scaled_dot_product_attention`` (scale 1/√dim_head), an output projection.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])  # a list for diffusers' "to_out.0"

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, N, dim_head]
            for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class Timesteps(nn.Module):
    """Sinusoidal embedding ``[cos | sin]`` of timesteps ``[B]`` → ``[B, dim]`` (``dim`` even).

    diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True, downscale_freq_shift=0``, in the
    same float32 operations, so the result is bit-identical.
    """

    def __init__(self, dim: int, max_period: int = 10000) -> None:
        super().__init__()
        self.dim, self.max_period = dim, max_period

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(self.max_period) * torch.arange(
            half, dtype=torch.float32, device=timesteps.device
        )
        angles = timesteps[:, None].float() * torch.exp(exponent / half)[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → linear: the MLP that turns the sinusoidal embedding into the ResNet time input."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))

"""The two steps an engine compiles, as modules with fixed inputs: the UNet at t = 0 and the VAE decode."""

import torch

from musetalk_ops.engine.spec import StepSpec
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae import decode_latents
from musetalk_ops.models.vae_model import VAE


class _UNetStep(torch.nn.Module):
    """UNet at t = 0: (latents [B,8,32,32], audio tokens [B,50,384]) → latents [B,4,32,32]."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        timestep = torch.zeros((1,), dtype=torch.int64, device=latents.device)
        return self.unet(latents, timestep, tokens)


class _DecodeStep(torch.nn.Module):
    """VAE decode to uint8 faces [B,256,256,3], exactly ``decode_latents``."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents.__wrapped__(self.vae, latents)  # without its inference-mode decorator


def engine_steps(unet: UNet, vae: VAE) -> dict[str, torch.nn.Module]:
    """The two steps an engine compiles, by step (also the name of a step's package file)."""
    return {"unet": _UNetStep(unet).eval(), "vae": _DecodeStep(vae).eval()}


def step_inputs(spec: StepSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Zero inputs of ``spec``'s step, contiguous as the generator's buffers (a package assumes its
    example inputs' strides)."""
    if spec.step == "unet":
        return (
            torch.zeros((spec.batch, 8, 32, 32), device=device, dtype=dtype),
            torch.zeros((spec.batch, 50, 384), device=device, dtype=dtype),
        )
    return (torch.zeros((spec.batch, 4, 32, 32), device=device, dtype=dtype),)


def step_output_shape(spec: StepSpec) -> tuple[int, ...]:
    return (spec.batch, 4, 32, 32) if spec.step == "unet" else (spec.batch, 256, 256, 3)


def step_weights(step: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A step's parameters and buffers by name: what its package's constants are bound to."""
    return {**dict(step.named_parameters()), **dict(step.named_buffers())}

"""An engine ready to call: its packages loaded and bound to the models' own weights."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from musetalk_ops.engine.build import build_engine
from musetalk_ops.engine.runner import bound_step, oom_count, run_step
from musetalk_ops.engine.spec import find_engine_for, step_spec
from musetalk_ops.engine.steps import engine_steps
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae_model import VAE


@dataclass
class Engine:
    """The loaded packages, called like the models: ``unet(latents, tokens)`` at any of ``batches`` (the
    package built for that batch size runs), ``vae(latents)`` at its slice (``vae.decode_sliced`` feeds
    it)."""

    paths: dict[str, Path]
    batches: tuple[int, ...]
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    vae: Callable[[torch.Tensor], torch.Tensor]

    @property
    def name(self) -> str:
        return " + ".join(path.name for path in self.paths.values())


def load_engine(paths: dict[str, Path], unet: UNet, vae: VAE) -> Engine:
    """Load the packages in ``paths`` (by part) and bind them to the weights of ``unet`` and ``vae`` (not
    copied: the engine reads the models' own tensors, which must stay alive and unchanged)."""
    steps, device = engine_steps(unet, vae), unet.device
    unets, vaes = {}, []
    for path in paths.values():
        spec = step_spec(path)
        runner = bound_step(path, spec.step, steps[spec.step], device)
        if spec.step == "unet":
            unets[spec.batch] = runner
        else:
            vaes.append(runner)
    (vae_runner,) = vaes

    def run_unet(latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        runner = unets.get(len(latents))
        if runner is None:
            raise ValueError(f"the engine's UNet runs batches of {sorted(unets)}, not {len(latents)}")
        return run_step(runner, [latents, tokens], lambda: oom_count(device))

    return Engine(
        paths=dict(paths),
        batches=tuple(sorted(unets)),
        unet=run_unet,
        vae=lambda latents: run_step(vae_runner, [latents], lambda: oom_count(device)),
    )


def engine_for(unet: UNet, vae: VAE, batch: int, *, root: str | os.PathLike | None = None) -> Engine:
    """``find_engine_for``'s engine, loaded; missing parts are built first with default settings
    (minutes, once per GPU type)."""
    paths = find_engine_for(unet, vae, batch, root) or build_engine(unet, vae, batch, root=root)
    return load_engine(paths, unet, vae)

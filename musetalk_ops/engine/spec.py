"""What an engine's part depends on (``StepSpec``), and where its package is stored and found."""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from musetalk_ops.config import cache_dir, dtype_name
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae import decode_slices
from musetalk_ops.models.vae_model import VAE

# Raised whenever the way steps are built changes; part of every spec (and key), so that a package of
# older model code is never found.
ENGINE_FORMAT = 3
MANIFEST = "engine.json"


@dataclass(frozen=True)
class StepSpec:
    """Everything a step's compiled package depends on except the weights' values."""

    format: int  # ENGINE_FORMAT: how this code builds the steps
    step: str  # "unet" or "vae"
    device: str  # "NVIDIA H100 80GB HBM3 sm90", or "cpu"
    torch: str  # torch and CUDA versions
    dtype: str
    batch: int  # frames per call: the render batch for the UNet, its decode slice for the VAE
    autotune: bool
    structure: str  # hash of the step's model: parameter names, shapes and dtypes, and its config

    @property
    def part(self) -> str:
        """The part of an engine this is: ``unet-b64``, ``vae-b32``."""
        return f"{self.step}-b{self.batch}"

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        device = re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")[:40]
        tuned = "-autotune" if self.autotune else ""
        return f"{device}-{self.dtype}-{self.step}-b{self.batch}{tuned}-{digest}"


def _structure(model: UNet | VAE) -> str:
    digest = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    for key, value in model.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
    return digest.hexdigest()[:16]


def unet_batches(batch: int) -> tuple[int, ...]:
    """The UNet's batch sizes in an engine for render ``batch``: the batch, and its decode slice where
    that is smaller (64 → (32, 64); 48 → (24, 48); 32 → (32,)). The slice costs one more UNet build and
    no decode of its own (the VAE runs at the slice anyway)."""
    return tuple(sorted({decode_slices(batch)[1], batch}))


def engine_specs(unet: UNet, vae: VAE, batch: int, *, autotune: bool = False) -> dict[str, StepSpec]:
    """The specs of an engine's parts for these models (on their device and dtype) at render ``batch``,
    by part name: the UNet at each of ``unet_batches``, the VAE decode at its slice."""
    device = unet.device
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    else:
        name = device.type
    common = {
        "format": ENGINE_FORMAT,
        "device": name,
        "torch": f"{torch.__version__} cuda {torch.version.cuda}",
        "dtype": dtype_name(unet.dtype),
        "autotune": autotune,
    }
    unet_structure = _structure(unet)
    specs = [StepSpec(step="unet", batch=b, structure=unet_structure, **common) for b in unet_batches(batch)]
    specs.append(StepSpec(step="vae", batch=decode_slices(batch)[1], structure=_structure(vae), **common))
    return {spec.part: spec for spec in specs}


def engines_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else cache_dir() / "engines"


def step_spec(path: Path) -> StepSpec:
    """The spec a complete package was built for, from its manifest (OSError if there is none, ValueError
    if it is torn or of another format)."""
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != ENGINE_FORMAT:
        raise ValueError(f"{path} is an engine of format {manifest.get('format')}, not {ENGINE_FORMAT}")
    return StepSpec(**manifest["spec"])


def find_step(spec: StepSpec, root: str | os.PathLike | None = None) -> Path | None:
    """The directory of a complete package for ``spec`` under ``root``, or None."""
    path = engines_dir(root) / spec.key
    try:
        found = step_spec(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return path if found == spec else None


def find_engine_for(
    unet: UNet, vae: VAE, batch: int, root: str | os.PathLike | None = None
) -> dict[str, Path] | None:
    """Each part's package for these models at render ``batch`` (an autotuned one where one was built,
    else the default), by part; None unless every part is there."""
    specs = engine_specs(unet, vae, batch, autotune=True)  # hashes the models' structure once for all
    found = {}
    for part, spec in specs.items():
        path = find_step(spec, root) or find_step(replace(spec, autotune=False), root)
        if path is None:
            return None
        found[part] = path
    return found

"""Ahead-of-time compiled UNet and VAE decode (AOTInductor): built once per GPU type, loaded in a second.

Why: compiled code runs UNet + VAE about twice as fast as CUDA graphs of the eager models, but
``torch.compile`` costs every fresh process 33 s (warm on-disk cache) to 81 s (cold) before its first
frame, which a short clip cannot repay. An AOTInductor package holds the compiled kernels and the C++
that launches them; a process loads it and points it at the weights it has already loaded: no tracing,
no compiling, and ``torch._inductor`` is not even imported.

Weights are not in the package (``package_constants_in_so=False``), so one engine serves any weights of
the same architecture (the official ones, demo ones, a fine-tune) and is a few MB. Constants Inductor
derives from weights (transposed or padded copies) are recomputed from the loaded weights when they are
bound (runtime constant folding): without it, such a constant is baked in at build time and a different
set of weights silently gives different outputs (tests load other weights than the engine was built with).

An engine is valid for one GPU type, torch/CUDA version, dtype, batch size and model structure;
``EngineSpec.key`` names all of them, and the engine lives in ``<root>/<key>/`` (``engine.json`` last, the
directory renamed into place, so a half-built engine is never found). ``root`` defaults to
``$MUSETALK_CACHE/engines``; in Kubernetes a GPU Job builds it onto the weights volume (k8s/engine.yaml).
"""

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from musetalk_ops.config import cache_dir, dtype_name
from musetalk_ops.errors import InputError
from musetalk_ops.files import write_json
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae import decode_latents
from musetalk_ops.models.vae_model import VAE

ENGINE_FORMAT = 1
MANIFEST = "engine.json"
# Inductor settings of a build: always runtime constant folding and weights left out (see above);
# ``autotune`` adds max-autotune (Triton templates benchmarked against cuDNN/cuBLAS per shape).
BUILD_CONFIG = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": True,
}
AUTOTUNE_CONFIG = {"max_autotune": True}


@dataclass(frozen=True)
class EngineSpec:
    """Everything a compiled engine depends on except the weights' values."""

    device: str  # "NVIDIA H100 80GB HBM3 sm90", or "cpu"
    torch: str  # torch and CUDA versions
    dtype: str
    batch: int
    autotune: bool
    structure: str  # hash of both models' parameter names, shapes and dtypes, and their configs

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        device = re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")[:40]
        return f"{device}-{self.dtype}-b{self.batch}{'-autotune' if self.autotune else ''}-{digest}"


def engine_spec(unet: UNet, vae: VAE, batch: int, *, autotune: bool = False) -> EngineSpec:
    """The spec an engine for these models (on their device and dtype) at ``batch`` would have."""
    device = unet.device
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    else:
        name = device.type
    structure = hashlib.sha256()
    for model in (unet, vae):
        structure.update(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
        for key, value in model.state_dict().items():
            structure.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
    return EngineSpec(
        device=name,
        torch=f"{torch.__version__} cuda {torch.version.cuda}",
        dtype=dtype_name(unet.dtype),
        batch=batch,
        autotune=autotune,
        structure=structure.hexdigest()[:16],
    )


def engines_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else cache_dir() / "engines"


def find_engine(spec: EngineSpec, root: str | os.PathLike | None = None) -> Path | None:
    """The directory of a complete engine for ``spec`` under ``root``, or None."""
    path = engines_dir(root) / spec.key
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != ENGINE_FORMAT or manifest.get("spec") != asdict(spec):
        return None
    return path


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


def _steps(unet: UNet, vae: VAE) -> dict[str, torch.nn.Module]:
    return {"unet": _UNetStep(unet).eval(), "vae": _DecodeStep(vae).eval()}


def build_engine(
    unet: UNet,
    vae: VAE,
    batch: int,
    *,
    autotune: bool = False,
    root: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda _message: None,
) -> Path:
    """Export and compile both steps for ``batch`` and store the engine; returns its directory.

    Takes minutes on a GPU (more with ``autotune``); a complete engine already there is reused."""
    spec = engine_spec(unet, vae, batch, autotune=autotune)
    found = find_engine(spec, root)
    if found is not None:
        return found
    # Imported here: export and Inductor cost seconds to import, and only a build needs them.
    from torch._inductor import aoti_compile_and_package

    final = engines_dir(root) / spec.key
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{spec.key}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    seconds: dict[str, float] = {}
    try:
        device, dtype = unet.device, unet.dtype
        # contiguous, as the generator's buffers: an engine assumes its example inputs' strides
        inputs = {
            "unet": (
                torch.zeros((batch, 8, 32, 32), device=device, dtype=dtype),
                torch.zeros((batch, 50, 384), device=device, dtype=dtype),
            ),
            "vae": (torch.zeros((batch, 4, 32, 32), device=device, dtype=dtype),),
        }
        configs = {**BUILD_CONFIG, **(AUTOTUNE_CONFIG if autotune else {})}
        with torch.no_grad():
            for name, step in _steps(unet, vae).items():
                log(f"compiling the {name} for batch {batch} on {spec.device} (minutes)")
                start = time.perf_counter()
                exported = torch.export.export(step, inputs[name])
                aoti_compile_and_package(
                    exported, package_path=str(staging / f"{name}.pt2"), inductor_configs=configs
                )
                seconds[name] = round(time.perf_counter() - start, 1)
        manifest = {
            "format": ENGINE_FORMAT,
            "spec": asdict(spec),
            "build_seconds": seconds,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(staging / MANIFEST, manifest)
        try:
            staging.rename(final)
        except OSError:  # another process finished the same engine first: keep theirs
            if find_engine(spec, root) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


@dataclass
class Engine:
    """The loaded steps, called like the models: ``unet(latents, tokens)``, ``vae(latents)``."""

    path: Path
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    vae: Callable[[torch.Tensor], torch.Tensor]


def load_engine(path: str | os.PathLike, unet: UNet, vae: VAE) -> Engine:
    """Load the engine in ``path`` and bind it to the weights of ``unet`` and ``vae`` (not copied: the
    engine reads the models' own tensors, which must stay alive and unchanged)."""
    path = Path(path)
    device_index = unet.device.index if unet.device.type == "cuda" else -1
    if unet.device.type == "cuda" and device_index is None:
        device_index = torch.cuda.current_device()
    runners = {}
    for name, step in _steps(unet, vae).items():
        # single-threaded: no locking inside the runner, which CUDA graph capture needs; the generator
        # serialises calls itself
        runner = torch._C._aoti.AOTIModelPackageLoader(
            str(path / f"{name}.pt2"), "model", True, 1, device_index
        )
        weights = {**dict(step.named_parameters()), **dict(step.named_buffers())}
        needed = runner.get_constant_fqns()
        missing = [fqn for fqn in needed if fqn not in weights and not fqn.startswith("_FOLDED_CONST_")]
        if missing:
            raise InputError(f"engine {path} does not match the loaded {name}: it needs {missing[0]}")
        runner.load_constants({fqn: weights[fqn] for fqn in needed if fqn in weights}, False, True, True)
        runners[name] = runner
    unet_runner, vae_runner = runners["unet"], runners["vae"]
    return Engine(
        path=path,
        unet=lambda latents, tokens: unet_runner.run([latents, tokens])[0],
        vae=lambda latents: vae_runner.run([latents])[0],
    )


def find_engine_for(unet: UNet, vae: VAE, batch: int, root: str | os.PathLike | None = None) -> Path | None:
    """An autotuned engine for these models at ``batch`` where one was built, else the default one."""
    for autotune in (True, False):
        found = find_engine(engine_spec(unet, vae, batch, autotune=autotune), root)
        if found is not None:
            return found
    return None


def engine_for(unet: UNet, vae: VAE, batch: int, *, root: str | os.PathLike | None = None) -> Engine:
    """``find_engine_for``'s engine, loaded; the default one is built first if there is none (minutes,
    once per GPU type)."""
    path = find_engine_for(unet, vae, batch, root) or build_engine(unet, vae, batch, root=root)
    return load_engine(path, unet, vae)

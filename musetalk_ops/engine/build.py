"""Building an engine: export each step, compile it with Inductor, check it in a fresh process, store it."""

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from musetalk_ops.config import torch_dtype
from musetalk_ops.engine.check import check_step
from musetalk_ops.engine.compiler import engine_compiler
from musetalk_ops.engine.spec import ENGINE_FORMAT, MANIFEST, StepSpec, engine_specs, engines_dir, find_step
from musetalk_ops.engine.steps import engine_steps, step_inputs
from musetalk_ops.files import write_json
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae_model import VAE

# Inductor settings of every build: runtime constant folding and weights left out (see the package doc).
BUILD_CONFIG = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": True,
}
# Per step, in every build: the VAE decode's own kernels (group norms, pointwise: a third of its time)
# are tuned by coordinate descent, which pays for its build minutes there and not on the UNet
# (bench/RESULTS.md).
STEP_CONFIGS = {"unet": {}, "vae": {"coordinate_descent_tuning": True}}
# ``autotune`` adds max-autotune (Triton templates benchmarked against cuDNN/cuBLAS per shape) and
# coordinate descent for both steps; its UNet compiles for many minutes, a job for k8s/engine.yaml.
AUTOTUNE_CONFIG = {"max_autotune": True, "coordinate_descent_tuning": True}


def build_configs(step: str, autotune: bool, cxx: str | None) -> dict:
    """Inductor settings of a build of ``step`` ("unet" or "vae") with the C++ compiler ``cxx``
    (``engine_compiler``'s choice; None: Inductor's default)."""
    return {
        **BUILD_CONFIG,
        **STEP_CONFIGS[step],
        **(AUTOTUNE_CONFIG if autotune else {}),
        **({"cpp.cxx": (None, cxx)} if cxx else {}),
    }


def compile_step(
    step: torch.nn.Module, inputs: tuple[torch.Tensor, ...], package: Path, configs: dict
) -> float:
    """Export ``step`` and compile it into the AOTInductor package ``package``; returns the seconds."""
    # Imported here: export and Inductor cost seconds to import, and only a build needs them.
    from torch._inductor import aoti_compile_and_package

    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(step, inputs)
        aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)
    return round(time.perf_counter() - start, 1)


def build_step(
    spec: StepSpec,
    step: torch.nn.Module,
    device: torch.device,
    root: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda _message: None,
) -> Path:
    """Export and compile ``step`` for ``spec``, check it in a fresh process and store it; returns its
    directory. Takes minutes on a GPU; a complete package already there is reused."""
    found = find_step(spec, root)
    if found is not None:
        return found
    final = engines_dir(root) / spec.key
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{spec.key}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        cxx = engine_compiler()
        log(f"C++ compiler for the wrapper: {cxx or 'Inductor default ($CXX, else g++)'}")
        log(f"compiling the {spec.step} for batch {spec.batch} on {spec.device} (minutes)")
        inputs = step_inputs(spec, device, torch_dtype(spec.dtype))
        seconds = compile_step(
            step, inputs, staging / f"{spec.step}.pt2", build_configs(spec.step, spec.autotune, cxx)
        )
        manifest = {
            "format": ENGINE_FORMAT,
            "spec": asdict(spec),
            "build_seconds": seconds,
            "cxx": cxx,  # None: Inductor's default
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        check_step(staging, spec, step, device)
        write_json(staging / MANIFEST, manifest)
        try:
            staging.rename(final)
        except OSError:  # another process finished the same package first: keep theirs
            if find_step(spec, root) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def build_engine(
    unet: UNet,
    vae: VAE,
    batch: int,
    *,
    autotune: bool = False,
    root: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda _message: None,
) -> dict[str, Path]:
    """The packages of an engine for render ``batch``, each built first where there is none (minutes on
    a GPU, more with ``autotune``); returns their directories by part."""
    steps = engine_steps(unet, vae)
    return {
        part: build_step(spec, steps[spec.step], unet.device, root, log)
        for part, spec in engine_specs(unet, vae, batch, autotune=autotune).items()
    }

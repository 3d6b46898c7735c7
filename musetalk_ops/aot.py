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

The C++ wrapper of an engine must share the C++ runtime of the process that loads it. The lent GPU
image sets ``CXX`` to a GCC of its own whose libstdc++ ends up linked statically into the wrapper; loading
it then dies of SIGSEGV in the wrapper's first ``std::regex`` (two copies of libstdc++'s locale tables;
bench/RESULTS.md, session 4). So a build picks the compiler itself (``engine_compiler``): one whose
libstdc++ is the file this process has mapped. And a new engine is published only after a fresh
interpreter has loaded it, bound weights and run it once (``check_step``): a runtime that still
crashes leaves no engine behind, and renders keep to the ``graphs`` path instead of crashing.

An engine is a few packages, one per step and batch size ("part"), each built, checked and stored on
its own: the VAE decode at its slice of the render batch (``vae.decode_slices``: at most 32 frames), and
the UNet at the render batch and, where that is larger, at the slice too (``unet_batches``: 64 → 32 and
64), so that a chunk's last batch which one slice holds runs a UNet of that size instead of a whole
padded batch. Engines for 32 and 64 so share the decode and the UNet at 32. A part is valid for one GPU
type, torch/CUDA version, dtype, batch size and model structure; ``StepSpec.key`` names all of them, and
the package lives in ``<root>/<key>/`` (``engine.json`` last, the directory renamed into place, so a
half-built one is never found). ``root`` defaults to ``$MUSETALK_CACHE/engines``. A render on CUDA runs
the engine for its GPU and batch size wherever all its parts are there (``render.resolve_mode``); it
never builds one unasked. k8s/engine.yaml builds it on the GPU node.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from musetalk_ops.config import cache_dir, dtype_name, torch_dtype
from musetalk_ops.errors import EngineError
from musetalk_ops.files import write_json
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae import decode_latents, decode_slices
from musetalk_ops.models.vae_model import VAE

# 2: group norms from per-channel moments (layers.GroupNorm), the VAE's kernels tuned in every build.
# 3: a package per step, the VAE decode at its slice of the batch (vae.decode_slices).
# Part of a step's spec (and key): a package of older model code is never found.
ENGINE_FORMAT = 3
MANIFEST = "engine.json"
CHECK = "check.json"  # what the fresh-process check needs: device, dtype, the weights' shapes
# Test hook: the check process kills itself with this signal (e.g. SEGV) before loading, as a broken
# AOTInductor runtime does.
FAULT_CHECK_SIGNAL = "MUSETALK_FAULT_ENGINE_CHECK"
# A C++ compiler for engine builds, used as given (``engine_compiler`` picks one otherwise).
ENGINE_CXX = "MUSETALK_ENGINE_CXX"
# Inductor settings of every build: runtime constant folding and weights left out (see above).
BUILD_CONFIG = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": True,
}
# Per step, in every build: the VAE decode's own kernels (group norms, pointwise: a third of its time)
# are tuned by coordinate descent. With layers.GroupNorm, that took the engine's decode from 1.33–1.37 to
# 1.13–1.14 ms/frame for 182 s of build instead of 28 (H200; bench/RESULTS.md, session 7). The UNet's
# took more than 160 s to tune (JIT) for at most its 0.15 ms/frame of such kernels, so it is not tuned.
STEP_CONFIGS = {"unet": {}, "vae": {"coordinate_descent_tuning": True}}
# ``autotune`` adds max-autotune (Triton templates benchmarked against cuDNN/cuBLAS per shape) and
# coordinate descent for both steps. Max-autotune alone took the JIT-compiled VAE decode from 1.43 to
# 1.27 ms/frame (H100, session 3); an engine built with it is not measured: the UNet under it compiled
# for more than 6 minutes, longer than a lent-GPU call, so a tuned engine is a job for k8s/engine.yaml.
AUTOTUNE_CONFIG = {"max_autotune": True, "coordinate_descent_tuning": True}


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


def _libstdcxx(path: str) -> Path | None:
    """``path`` resolved if it is an existing absolute file (a compiler's answer may be a bare name)."""
    candidate = Path(path)
    return candidate.resolve() if candidate.is_absolute() and candidate.is_file() else None


def loaded_libstdcxx() -> Path | None:
    """The libstdc++ this process has mapped (torch loads it), or None where there is none or no /proc."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "/libstdc++.so" in fields[5]:
            return _libstdcxx(fields[5].strip())
    return None


def compiler_libstdcxx(compiler: str) -> Path | None:
    """The libstdc++ that ``compiler`` links a shared library against, or None if it has no shared one
    (it would then link the static archive) or does not run."""
    try:
        proc = subprocess.run(
            [compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return _libstdcxx(proc.stdout.strip()) if proc.returncode == 0 else None


def engine_compiler() -> str | None:
    """The C++ compiler for an engine's wrapper: ``$MUSETALK_ENGINE_CXX`` as given, else the first of
    ``$CXX``, g++, c++ and clang++ whose libstdc++ is the one this process has mapped; None (Inductor's
    default) when none is (``check_step`` still guards the result)."""
    if os.environ.get(ENGINE_CXX):
        return os.environ[ENGINE_CXX]
    loaded = loaded_libstdcxx()
    if loaded is None:
        return None
    names = dict.fromkeys(filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))
    for name in names:
        compiler = shutil.which(name)
        if compiler and compiler_libstdcxx(compiler) == loaded:
            return compiler
    return None


def engines_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else cache_dir() / "engines"


def find_step(spec: StepSpec, root: str | os.PathLike | None = None) -> Path | None:
    """The directory of a complete package for ``spec`` under ``root``, or None."""
    path = engines_dir(root) / spec.key
    try:
        found = step_spec(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return path if found == spec else None


def step_spec(path: Path) -> StepSpec:
    """The spec a complete package was built for, from its manifest (OSError if there is none, ValueError
    if it is torn or of another format)."""
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != ENGINE_FORMAT:
        raise ValueError(f"{path} is an engine of format {manifest.get('format')}, not {ENGINE_FORMAT}")
    return StepSpec(**manifest["spec"])


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


def _weights(step: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(step.named_parameters()), **dict(step.named_buffers())}


def _loader(path: Path, name: str, device: torch.device):
    """The C++ package loader (not ``torch._inductor.aoti_load_package``, which imports Inductor).
    Single-threaded: no locking inside the runner, which CUDA graph capture needs; the generator
    serialises calls itself."""
    index = (
        -1
        if device.type != "cuda"
        else device.index
        if device.index is not None
        else torch.cuda.current_device()
    )
    return torch._C._aoti.AOTIModelPackageLoader(str(path / f"{name}.pt2"), "model", True, 1, index)


def _bind(runner, weights: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Point the runner at ``weights`` (not copied); constants it derives from them are refolded."""
    needed = runner.get_constant_fqns()
    missing = [fqn for fqn in needed if fqn not in weights and not fqn.startswith("_FOLDED_CONST_")]
    if missing:
        raise EngineError(f"engine {path} does not match the loaded {name}: it needs {missing[0]}")
    runner.load_constants({fqn: weights[fqn] for fqn in needed if fqn in weights}, False, True, True)


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


def bound_step(path: Path, name: str, step: torch.nn.Module, device: torch.device):
    """The runner of ``path``'s package ``name``, bound to ``step``'s own weights (not copied)."""
    runner = _loader(path, name, device)
    _bind(runner, _weights(step), path, name)
    return runner


def check_step(path: Path, spec: StepSpec, step: torch.nn.Module, device: torch.device) -> None:
    """Load ``path``'s package in a fresh interpreter, bind zero weights of the step's shapes and run it
    once; raise ``EngineError`` (naming the signal of a crash) if that fails."""
    write_json(
        path / CHECK,
        {
            "spec": asdict(spec),
            "device": str(device),
            "shapes": {fqn: list(t.shape) for fqn, t in _weights(step).items()},
        },
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "musetalk_ops.aot", str(path)], capture_output=True, text=True, timeout=900
        )
    finally:
        (path / CHECK).unlink(missing_ok=True)
    if proc.returncode != 0:
        how = (
            f"crashed with {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
        )
        raise EngineError(
            f"the engine built for {device} does not load and run in a fresh process ({how}); "
            "nothing was kept, renders use the graphs path"
        )


def _check_main(path: Path) -> None:
    """``check_step``'s fresh process."""
    fault = os.environ.get(FAULT_CHECK_SIGNAL)
    if fault:
        os.kill(os.getpid(), signal.Signals[f"SIG{fault}"])
    check = json.loads((path / CHECK).read_text())
    spec, device = StepSpec(**check["spec"]), torch.device(check["device"])
    dtype = torch_dtype(spec.dtype)
    runner = _loader(path, spec.step, device)
    weights = {fqn: torch.zeros(shape, device=device, dtype=dtype) for fqn, shape in check["shapes"].items()}
    _bind(runner, weights, path, spec.step)
    (out,) = runner.run(list(step_inputs(spec, device, dtype)))
    if tuple(out.shape) != step_output_shape(spec):
        raise SystemExit(f"{spec.step} returned {tuple(out.shape)}, expected {step_output_shape(spec)}")


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


def oom_count(device: torch.device) -> int:
    """Out-of-memory errors the CUDA caching allocator has raised on ``device`` so far (0 on the CPU)."""
    return torch.cuda.memory_stats(device).get("num_ooms", 0) if device.type == "cuda" else 0


def run_step(runner, inputs: list[torch.Tensor], ooms: Callable[[], int]) -> torch.Tensor:
    """One call of an engine step. A CUDA out-of-memory error inside the engine reaches Python as a bare
    RuntimeError ("run_func_ … API call failed"; seen on an H200, bench/RESULTS.md session 5), which the
    render's batch-halving fallback would not recognise; the allocator's OOM count tells it apart, and it
    is raised again as ``torch.cuda.OutOfMemoryError``."""
    before = ooms()
    try:
        return runner.run(inputs)[0]
    except RuntimeError as e:
        if ooms() > before:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory inside the AOT engine") from e
        raise


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


def engine_for(unet: UNet, vae: VAE, batch: int, *, root: str | os.PathLike | None = None) -> Engine:
    """``find_engine_for``'s engine, loaded; missing parts are built first with default settings
    (minutes, once per GPU type)."""
    paths = find_engine_for(unet, vae, batch, root) or build_engine(unet, vae, batch, root=root)
    return load_engine(paths, unet, vae)


if __name__ == "__main__":
    _check_main(Path(sys.argv[1]))

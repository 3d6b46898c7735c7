"""A step's package as a runner: loaded without Inductor, bound to weights, called with OOMs recognised."""

from collections.abc import Callable
from pathlib import Path

import torch

from musetalk_ops.engine.steps import step_weights
from musetalk_ops.errors import EngineError


def open_runner(path: Path, name: str, device: torch.device):
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


def bind(runner, weights: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Point the runner at ``weights`` (not copied); constants it derives from them are refolded."""
    needed = runner.get_constant_fqns()
    missing = [fqn for fqn in needed if fqn not in weights and not fqn.startswith("_FOLDED_CONST_")]
    if missing:
        raise EngineError(f"engine {path} does not match the loaded {name}: it needs {missing[0]}")
    runner.load_constants({fqn: weights[fqn] for fqn in needed if fqn in weights}, False, True, True)


def bound_step(path: Path, name: str, step: torch.nn.Module, device: torch.device):
    """The runner of ``path``'s package ``name``, bound to ``step``'s own weights (not copied)."""
    runner = open_runner(path, name, device)
    bind(runner, step_weights(step), path, name)
    return runner


def oom_count(device: torch.device) -> int:
    """Out-of-memory errors the CUDA caching allocator has raised on ``device`` so far (0 on the CPU)."""
    return torch.cuda.memory_stats(device).get("num_ooms", 0) if device.type == "cuda" else 0


def run_step(runner, inputs: list[torch.Tensor], ooms: Callable[[], int]) -> torch.Tensor:
    """One call of an engine step. A CUDA out-of-memory error inside the engine reaches Python as a bare
    RuntimeError ("run_func_ … API call failed"), which the render's batch-halving fallback would not
    recognise; the allocator's OOM count tells it apart, and it is raised again as
    ``torch.cuda.OutOfMemoryError``."""
    before = ooms()
    try:
        return runner.run(inputs)[0]
    except RuntimeError as e:
        if ooms() > before:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory inside the AOT engine") from e
        raise

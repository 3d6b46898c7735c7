"""The check that gates publishing a package: a fresh interpreter loads it, binds zero weights of the
step's shapes and runs it once, so that a C++ runtime that crashes never leaves an engine behind."""

import json
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from musetalk_ops.config import torch_dtype
from musetalk_ops.engine.runner import bind, open_runner
from musetalk_ops.engine.spec import StepSpec
from musetalk_ops.engine.steps import step_inputs, step_output_shape, step_weights
from musetalk_ops.errors import EngineError
from musetalk_ops.files import write_json

CHECK = "check.json"  # what the fresh-process check needs: device, dtype, the weights' shapes


def check_step(path: Path, spec: StepSpec, step: torch.nn.Module, device: torch.device) -> None:
    """Load ``path``'s package in a fresh interpreter, bind zero weights of the step's shapes and run it
    once; raise ``EngineError`` (naming the signal of a crash) if that fails."""
    write_json(
        path / CHECK,
        {
            "spec": asdict(spec),
            "device": str(device),
            "shapes": {fqn: list(t.shape) for fqn, t in step_weights(step).items()},
        },
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "musetalk_ops.engine.check", str(path)],
            capture_output=True,
            text=True,
            timeout=900,
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
    check = json.loads((path / CHECK).read_text())
    spec, device = StepSpec(**check["spec"]), torch.device(check["device"])
    dtype = torch_dtype(spec.dtype)
    runner = open_runner(path, spec.step, device)
    weights = {fqn: torch.zeros(shape, device=device, dtype=dtype) for fqn, shape in check["shapes"].items()}
    bind(runner, weights, path, spec.step)
    (out,) = runner.run(list(step_inputs(spec, device, dtype)))
    if tuple(out.shape) != step_output_shape(spec):
        raise SystemExit(f"{spec.step} returned {tuple(out.shape)}, expected {step_output_shape(spec)}")


if __name__ == "__main__":
    _check_main(Path(sys.argv[1]))

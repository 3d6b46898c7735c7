"""Does this torch build run AOTInductor packages? A three-layer model, up to four build settings, two
loaders, each load in its own process (a crash kills only that one).

On the lent H200 (torch 2.11.0+cu130, 2026-12-03; the lent H100 image crashed the same way on 2026-11-25)
every load died of SIGSEGV, torch's own ``aoti_load_package`` with default settings included. The
backtrace (cuda-gdb) ends in the wrapper's ``parse_device_str`` → ``std::regex``: the image sets
``CXX=/opt/gcc/bin/g++``, whose wrapper carries its own libstdc++ (``ldd`` lists none), and two copies of
libstdc++'s locale tables do not mix. Built with the system g++ (13.3) instead, the ``ours`` package loaded
and matched eager with both loaders (bench/RESULTS.md, session 4). Hence
``musetalk_ops.aot.engine_compiler``, and the fresh-process check (``check_engine``) before publishing.

    python bench/aoti_crash.py [--device cuda] [--settings default,ours] [--cxx COMPILER]

Writes ``$OUT/aoti_crash.json`` (or ``./bench-out/``) and prints one line per build setting and loader.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {
    "default": {},
    "weights_outside": {"aot_inductor.package_constants_in_so": False},
    "runtime_folding": {"aot_inductor.use_runtime_constant_folding": True},
    "ours": {
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.use_runtime_constant_folding": True,
    },
}


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.silu(self.norm(self.conv(x))).mean((2, 3)))


def model_and_input(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return Tiny().to(device, dtype).eval(), torch.randn(4, 8, 16, 16, device=device, dtype=dtype)


def load_and_run(package: str, device: str, loader: str, weights_outside: bool) -> None:
    """The child: load ``package``, bind the weights if they are not inside, run, compare with eager."""
    model, x = model_and_input(device)
    weights = dict(model.named_parameters())
    if loader == "raw":
        runner = torch._C._aoti.AOTIModelPackageLoader(package, "model", True, 1, -1)
        if weights_outside:
            fqns = [f for f in runner.get_constant_fqns() if f in weights]
            runner.load_constants({f: weights[f] for f in fqns}, False, True, True)
        (out,) = runner.run([x])
    else:
        from torch._inductor import aoti_load_package

        compiled = aoti_load_package(package)
        if weights_outside:
            fqns = [f for f in compiled.get_constant_fqns() if f in weights]
            compiled.load_constants({f: weights[f] for f in fqns}, check_full_update=True, user_managed=True)
        out = compiled(x)
    with torch.no_grad():
        print(json.dumps({"max_abs_diff": (out.float() - model(x).float()).abs().max().item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument(
        "--settings", type=lambda v: v.split(","), default=list(SETTINGS), help="build settings to try"
    )
    parser.add_argument("--cxx", help="C++ compiler for the wrapper (Inductor's default: $CXX, else g++)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        package, device, loader, outside = args.child
        load_and_run(package, device, loader, outside == "1")
        return
    from torch._inductor import aoti_compile_and_package

    work = Path(tempfile.mkdtemp(prefix="aoti-crash-"))
    model, x = model_and_input(args.device)
    report = {"torch": torch.__version__, "device": args.device, "cxx": args.cxx or os.environ.get("CXX")}
    compiler = {"cpp.cxx": (None, args.cxx)} if args.cxx else {}
    for name in args.settings:
        settings = SETTINGS[name]
        package = work / f"{name}.pt2"
        t = time.perf_counter()
        with torch.no_grad():
            aoti_compile_and_package(
                torch.export.export(model, (x,)),
                package_path=str(package),
                inductor_configs={**settings, **compiler},
            )
        report[f"{name}/build_s"] = round(time.perf_counter() - t, 1)
        outside = str(int(not settings.get("aot_inductor.package_constants_in_so", True)))
        for loader in ("raw", "aoti_load_package"):
            child = [sys.executable, __file__, "--child", str(package), args.device, loader, outside]
            proc = subprocess.run(child, capture_output=True, text=True, timeout=300)
            if proc.returncode < 0:
                result = f"crashed: {signal.Signals(-proc.returncode).name}"
            elif proc.returncode:
                result = f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            else:
                result = (
                    f"ran, max |diff| vs eager {json.loads(proc.stdout.splitlines()[-1])['max_abs_diff']:.2g}"
                )
            report[f"{name}/{loader}"] = result
            print(f"{name:16} {loader:18} {result}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aoti_crash.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""UNet load time: the official fp32 ``unet.pth`` vs a ``musetalk models convert`` fp16 safetensors copy.

Writes a full-size random-weight UNet (official config, 849.9 M parameters, 3.4 GB fp32) in the official
layout under a temporary directory, times each way of loading it onto ``--device``, prints a table and
deletes everything. "cold" evicts the file from the page cache first (posix_fadvise DONTNEED), so it
reads from disk; "warm" reads the page cache. Times run until every weight page has been read (mapped
files load lazily), so they are comparable. Medians of ``--repeat`` runs.

    python -m bench.load_models [--device cuda] [--repeat 3] [--dir /tmp] [--skip-official]

Prints the seconds to write, hash and convert the file, then a table: one row per way of loading
(the official recipe, ours from the ``.pth`` in fp32 and fp16, ours from the converted copy), with its
cold and warm seconds.
"""

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from bench.assets import write_random_unet
from musetalk_ops.models.convert import convert_models
from musetalk_ops.models.layout import ModelLayout, file_sha256
from musetalk_ops.models.unet import OFFICIAL_UNET_CONFIG, load_unet


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def touch(model: torch.nn.Module) -> None:
    """Read one value per 4 KiB page of every tensor: memory-mapped weights count only once really read."""
    for t in [*model.parameters(), *model.buffers()]:
        t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum().item()


def timed(fn: Callable[[], torch.nn.Module], device: torch.device, cold: list[Path] | None) -> float:
    for path in cold or []:
        evict(path)
    gc.collect()
    start = time.perf_counter()
    model = fn()
    touch(model)
    sync(device)
    elapsed = time.perf_counter() - start
    assert next(model.parameters()).device.type == device.type
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def official_recipe(root: Path, device: torch.device) -> torch.nn.Module:
    """What MuseTalk itself does: random-init model, torch.load the whole pickle, load_state_dict, half."""
    config = {k: v for k, v in OFFICIAL_UNET_CONFIG.items() if not k.startswith("_")}
    model = UNet2DConditionModel(**config)
    weights = ModelLayout(root).unet_weights("v15")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return torch.nn.Module.to(model, device=device, dtype=torch.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the 5 GB of temporary files go")
    parser.add_argument("--skip-official", action="store_true", help="skip the slow official recipe")
    args = parser.parse_args()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="musetalk-load-bench-", dir=args.dir))
    root, cache = tmp / "models", tmp / "cache"
    try:
        t = time.perf_counter()
        pth = write_random_unet(root)
        print(f"wrote {pth.stat().st_size / 1e9:.2f} GB fp32 unet.pth in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        file_sha256(pth, cache)
        print(f"sha256 of unet.pth (once per file, memoised): {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        (converted,) = convert_models(root, cache, versions=("v15",))
        size = converted.stat().st_size / 1e9
        print(f"convert to fp16 safetensors ({size:.2f} GB): {time.perf_counter() - t:.1f} s")

        no_cache = tmp / "no-cache"  # an empty cache: load_unet cannot find the converted copy

        def ours(dtype: torch.dtype, cache_dir: Path) -> Callable[[], torch.nn.Module]:
            return lambda: load_unet(root, "v15", device, dtype, cache=cache_dir)

        ways = {
            "ours fp32 (.pth, mmap)": (ours(torch.float32, no_cache), [pth]),
            "ours fp16 (.pth, mmap, cast)": (ours(torch.float16, no_cache), [pth]),
            "ours fp16 (converted safetensors)": (ours(torch.float16, cache), [converted]),
        }
        if not args.skip_official:
            official = (lambda: official_recipe(root, device), [pth])
            ways = {"official recipe (init, torch.load, half)": official, **ways}
        rows = []
        for name, (fn, files) in ways.items():
            cold = statistics.median(timed(fn, device, files) for _ in range(args.repeat))
            warm = statistics.median(timed(fn, device, None) for _ in range(args.repeat))
            rows.append((name, cold, warm))
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        print(f"\nUNet load onto {device}{gpu}, torch {torch.__version__}, median of {args.repeat}")
        print(f"| {'path':<42} | cold s | warm s |")
        print(f"| {'-' * 42} | ------ | ------ |")
        for name, cold, warm in rows:
            print(f"| {name:<42} | {cold:6.2f} | {warm:6.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

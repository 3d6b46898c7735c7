"""Template preparation on a GPU against the fp32 CPU reference (issue #23's GPU check).

    python -m bench.prep_parity [--full] [--frames 25]

1. ``group_norm`` of a crop-like activation (the lower half constant, as a masked crop after the VAE's
   first convolution) in channels-last against contiguous memory, on the device and on the CPU.
2. The 512² astronaut prepared with its manual face box on the CPU in float32 (the reference) and on the
   device in float32 and float16; every cache is rendered on the CPU in float32 on the reference path,
   so only the preparation differs. Reports the latents' max difference and the frames' max level
   difference and share of values off by more than 1 (the goal: ±2 levels, ≤ 0.5 %).

Demo-size models unless ``--full`` (full-size random weights). Writes ``prep_parity.json`` into ``--out``.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import assets
from bench.common import Report, decoded
from musetalk_ops.render.chunks import render_chunk
from musetalk_ops.render.models import compute_features, load_render_models
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import read_cache


def group_norm_gap(device: torch.device) -> float:
    """Max |group_norm(channels-last) − group_norm(contiguous)| of a half-constant activation."""
    x = torch.randn(1, 128, 256, 256, generator=torch.Generator().manual_seed(0))
    x[:, :, 128:] = -1.0
    x = x.to(device)
    weight, bias = torch.ones(128, device=device), torch.zeros(128, device=device)
    contiguous = F.group_norm(x, 32, weight, bias, 1e-6)
    channels_last = F.group_norm(x.to(memory_format=torch.channels_last), 32, weight, bias, 1e-6)
    return float((contiguous - channels_last).abs().max())


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prep_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="full-size random weights instead of the demo set")
    p.add_argument("--frames", type=int, default=25, help="frames rendered from each cache (default 25)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")), help="report folder")
    args = p.parse_args()
    report = Report(args.out, 3600, sys.argv, filename="prep_parity.json")
    r = report.data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    r["group_norm_gap"] = {"cpu": group_norm_gap(torch.device("cpu")), str(device): group_norm_gap(device)}
    work = Path(tempfile.mkdtemp(prefix="musetalk-prep-parity-"))
    models_root = work / "models"
    assets.write_model_set(models_root, work, args.full)
    png, _video = assets.write_sources(work)
    wav = assets.write_speech_like(work / "speech.wav", args.frames / 25 + 0.1)
    cpu = RenderSettings(device="cpu", dtype="float32", models_root=models_root, mode="reference")
    models = load_render_models(cpu)
    features = compute_features(models, wav)
    variants = {"cpu-float32": ("cpu", "float32")}
    if device.type == "cuda":
        variants |= {"cuda-float32": ("cuda", "float32"), "cuda-float16": ("cuda", "float16")}
    frames, latents = {}, {}
    for name, (on, dtype) in variants.items():
        cache = work / f"tpl-{name}"
        assets.prepare(png, cache, assets.ASTRONAUT_BOX, models_root, "astronaut", device=on, dtype=dtype)
        template = read_cache(cache)
        latents[name] = template.latents.float()
        out = work / f"{name}.mp4"
        render_chunk(models, template, features, 0, args.frames, out, cpu)
        frames[name] = decoded(out).astype(np.int16)
    reference = frames["cpu-float32"]
    r["variants"] = {
        name: {
            "latents_max_abs": float((latents[name] - latents["cpu-float32"]).abs().max()),
            "frames_max_levels": int(np.abs(f - reference).max()),
            "frames_share_over_1": round(float((np.abs(f - reference) > 1).mean()) * 100, 4),
        }
        for name, f in frames.items()
    }
    report.save()
    print(json.dumps(r["group_norm_gap"]))
    print(f"{'prepared on':<16}{'latents max':>14}{'max levels':>12}{'% > 1':>9}")
    for name, v in r["variants"].items():
        print(
            f"{name:<16}{v['latents_max_abs']:>14.3e}{v['frames_max_levels']:>12}{v['frames_share_over_1']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

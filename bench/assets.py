"""Benchmark inputs: full-size random-weight models in the official layout, templates, speech-like audio.

Random weights cost exactly what the real ones cost (same architectures and shapes); the real loaders
read them. The UNet is the official config (849.9 M parameters, fp32 ``unet.pth`` plus the fp16
``musetalk models convert`` copy the renderer loads); the VAE is sd-vae-ft-mse's config; whisper-tiny's
encoder and BiSeNet come from the demo set, whose shapes are already the real ones.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from musetalk_ops.models.convert import convert_models
from musetalk_ops.models.demo import write_demo_models
from musetalk_ops.models.layout import ModelLayout
from musetalk_ops.models.unet import OFFICIAL_UNET_CONFIG, build_unet
from musetalk_ops.models.vae import OFFICIAL_VAE_CONFIG, build_vae
from musetalk_ops.prepare import prepare_template
from musetalk_ops.settings import TemplateSettings
from musetalk_ops.timings import Timings
from musetalk_ops.video import SegmentWriter

ASTRONAUT_BOX = (177, 66, 272, 175)  # landmark box before extra_margin (tests/conftest.py)
HD_SCALE = 4  # the astronaut scaled ×4 and cut to 1920×1080: a face of ~380×436 px, as in a close shot
HD_BOX = tuple(v * HD_SCALE for v in ASTRONAUT_BOX)
HD_FRAMES = 16


def write_random_unet(root: Path) -> Path:
    """The official UNet config with random weights as an fp32 ``unet.pth`` under ``root`` (3.4 GB)."""
    layout = ModelLayout(root)
    layout.unet_dir("v15").mkdir(parents=True)
    layout.unet_config("v15").write_text(json.dumps(OFFICIAL_UNET_CONFIG, indent=2))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_unet(OFFICIAL_UNET_CONFIG, "official").state_dict().items()}
    state = {k: torch.empty(s).normal_(0, 0.02) for k, s in shapes.items()}
    with layout.unet_weights("v15").open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return layout.unet_weights("v15")


def write_models(root: Path, cache: Path) -> dict[str, float]:
    """Full-size random models under ``root`` (official layout) and the fp16 UNet copy under ``cache``."""
    seconds = {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_models(tmp)
        demo = ModelLayout(tmp)
        for src in (*demo.whisper_files, demo.bisenet_weights, demo.resnet_weights):
            dst = root / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    seconds["whisper_bisenet"] = time.perf_counter() - t
    t = time.perf_counter()
    write_random_unet(root)
    seconds["unet_fp32"] = time.perf_counter() - t
    t = time.perf_counter()
    layout = ModelLayout(root)
    layout.vae_dir.mkdir(parents=True)
    layout.vae_config.write_text(json.dumps(OFFICIAL_VAE_CONFIG, indent=2))
    torch.save(build_vae(OFFICIAL_VAE_CONFIG, "official").state_dict(), layout.vae_weights)
    seconds["vae"] = time.perf_counter() - t
    t = time.perf_counter()
    convert_models(root, cache, versions=("v15",))
    seconds["convert_fp16"] = time.perf_counter() - t
    return seconds


def write_model_set(root: Path, work: Path, full: bool) -> None:
    """Full-size random weights (``full``, the GPU's case; its fp16 copies under ``work/cache``) or the
    demo-size set, in the official layout under ``root``."""
    if full:
        write_models(root, work / "cache")
    else:
        from musetalk_ops.models.demo import write_demo_models

        write_demo_models(root)


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut().copy()


def write_sources(directory: Path) -> tuple[Path, Path]:
    """The 512² astronaut PNG and a 16-frame 1920×1080 H.264 clip of it with sensor-like noise (σ 1.5,
    new each frame), so that every frame differs as in a real recording."""
    import cv2
    from PIL import Image

    image = astronaut()
    png = directory / "astronaut.png"
    Image.fromarray(image).save(png)
    big = cv2.resize(image, (512 * HD_SCALE, 512 * HD_SCALE), interpolation=cv2.INTER_CUBIC)[:1080, :1920]
    video = directory / "astronaut-1080p.mp4"
    with SegmentWriter(video, 25, 1920, 1080, crf=12) as writer:
        rng = np.random.default_rng(0)
        for _ in range(HD_FRAMES):
            noise = rng.normal(0, 1.5, big.shape).round().astype(np.int16)
            writer.write(np.clip(big.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return png, video


def prepare(
    source: Path,
    out: Path,
    box,
    models_root: Path,
    template_id: str,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[Path, dict]:
    """Prepare a template with a manual face box (default: on the GPU where there is one); returns the
    cache and per-stage seconds."""
    timings = Timings()
    start = time.perf_counter()
    cache = prepare_template(
        source,
        out,
        template_id=template_id,
        settings=TemplateSettings(face_box=box),
        models_root=models_root,
        device=device,
        dtype=dtype,
        timings=timings,
    )
    stages = {"load": round(timings.load, 3), **{k: round(v, 3) for k, v in timings.extra.items()}}
    stages["total"] = round(time.perf_counter() - start, 3)
    return cache, stages


def write_speech_like(path: Path, seconds: float, seed: int = 0) -> Path:
    """16 kHz mono WAV: voiced syllables (harmonics on a wandering pitch) and pauses. Its content does
    not change any cost; it only keeps the features in a realistic range."""
    rng = np.random.default_rng(seed)
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.3 * t) + 10 * rng.standard_normal(1)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 2
    wave = 0.3 * voice * syllables + 0.01 * rng.standard_normal(t.size)
    sf.write(path, (wave / np.abs(wave).max() * 0.8).astype(np.float32), rate, subtype="PCM_16")
    return path

"""What the benchmarks share: their inputs and models (``Bench``), the JSON report, GPU timing (a burst
and sustained, with the SM clock), a render timed as the product runs it, and frame comparisons.

Not a script: ``bench.render`` and ``bench.probe`` import it.
"""

import argparse
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from av.video.frame import VideoFrame
from av.video.reformatter import Interpolation

from bench import assets
from musetalk_ops.generator import FaceGenerator, StageClock
from musetalk_ops.render.chunks import render_chunk
from musetalk_ops.render.models import compute_features, load_render_models
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import load_template
from musetalk_ops.yuv import i420, rgb_to_yuv420

START = time.time()
ROOT = Path(__file__).resolve().parent.parent  # the repository: the working directory of child processes
GFLOP_PER_FRAME = 800.0  # fp16 work per frame: UNet 177.8 + VAE decode to 256² 622.2
ALWAYS = ("setup", "prepare", "engine")  # sections every run needs, whatever --sections names


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda() else 0.0


class Report:
    """Sections of results, saved to JSON after each one; failures are recorded, not fatal."""

    def __init__(
        self,
        out: Path,
        budget: float,
        argv: list[str],
        sections: list[str] | None = None,
        filename: str = "bench.json",
    ) -> None:
        self.out, self.deadline, self.sections, self.filename = out, START + budget, sections, filename
        self.data: dict = {"command": " ".join(["python", *argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.data["errors"] = {}

    def run(self, name: str, fn: Callable[[dict], None], needs: float = 0.0) -> None:
        """``fn(entry)`` fills ``data[name]``; skipped when less than ``needs`` seconds of budget are left
        or when ``--sections`` names others (setup, prepare and engine always run)."""
        left = self.deadline - time.time()
        if self.sections and name not in self.sections and name not in ALWAYS:
            return
        if left < needs:
            self.data.setdefault("skipped", []).append(name)
            print(f"[{name}] skipped: {left:.0f} s left, needs ~{needs:.0f}", flush=True)
            return
        t = time.time()
        print(f"[{name}] start ({left:.0f} s left)", flush=True)
        entry = self.data.setdefault(name, {})
        try:
            fn(entry)
        except Exception as exc:  # recorded; the remaining sections still run
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        entry["section_seconds"] = round(time.time() - t, 2)
        print(f"[{name}] done in {time.time() - t:.1f} s", flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / self.filename).write_text(json.dumps(self.data, indent=1, default=str))


HOT_SECONDS = 8.0  # back-to-back work before a "sustained" measurement: the H200 reaches its 700 W cap


class GpuClock:
    """SM clock (MHz) and board power (W) sampled by ``nvidia-smi`` every 100 ms inside the block: a
    power-capped GPU lowers its clock under sustained load."""

    def __enter__(self) -> "GpuClock":
        query = ["--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "100"]
        self.proc = subprocess.Popen(["nvidia-smi", *query], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        rows = [line.split(",") for line in self.proc.communicate()[0].splitlines() if line.count(",") == 1]
        clocks, power = [float(c) for c, _ in rows], [float(w) for _, w in rows]
        self.summary = {
            "samples": len(rows),
            "sm_mhz_median": statistics.median(clocks) if clocks else None,
            "sm_mhz_min": min(clocks, default=None),
            "power_w_max": max(power, default=None),
        }


def heat(step: Callable[[], object], seconds: float = HOT_SECONDS) -> None:
    """Run ``step`` back to back for ``seconds`` (synced every 8 calls, so the queue stays short)."""
    end, calls = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        step()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def matmul_tflops(hot: bool = False) -> float:
    """fp16 8192³ matmul rate: a cold GPU's burst, or (``hot``) after ``HOT_SECONDS`` of matmuls."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))
    for _ in range(3):
        a @ b
    if hot:
        heat(lambda: a @ b)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * n**3 / statistics.median(times) / 1e12


def synced_seconds(step: Callable[[int], object], iters: int) -> list[float]:
    """Wall seconds of ``step(i)`` for i in range(iters), each alone: the device synced before and after."""
    times = []
    for i in range(iters):
        sync()
        t = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t)
    return times


def measure_generator(gen, models, batch: int, iters: int = 8) -> dict:
    inputs = [
        (
            torch.randn(batch, 8, 32, 32, device=models.device, dtype=models.dtype),
            torch.randn(batch, 50, 384, device=models.device, dtype=models.dtype),
        )
        for _ in range(2)
    ]
    t = time.perf_counter()
    gen(*inputs[0], StageClock(models.device))
    sync()
    first = time.perf_counter() - t
    for i in range(2):
        gen(*inputs[i % 2], StageClock(models.device))
    clock = StageClock(models.device)
    times = synced_seconds(lambda i: gen(*inputs[i % 2], clock), iters)
    split = clock.totals()
    result = {
        "fps": round(batch / statistics.median(times), 1),
        "unet_ms_per_frame": round(1000 * split.get("unet", 0) / iters / batch, 3),
        "vae_ms_per_frame": round(1000 * split.get("vae_decode", 0) / iters / batch, 3),
        "first_call_s": round(first, 2),
        "build_s": round(gen.build_seconds, 2),
        "peak_gpu_gb": peak_gb(),
    }
    if models.device.type == "cuda":  # as a long render runs: back to back, after the GPU is hot
        with GpuClock() as gpu:
            heat(lambda: gen(*inputs[0], StageClock(models.device)))
            t, calls = time.perf_counter(), 48
            for i in range(calls):
                gen(*inputs[i % 2], StageClock(models.device))
            sync()
            result["sustained_fps"] = round(calls * batch / (time.perf_counter() - t), 1)
        result["sustained_gpu"] = gpu.summary
    return result


def generator_fps(models, mode: str, batch: int, cudnn_benchmark: bool) -> dict:
    """UNet + VAE decode alone, a new generator for one full bucket: frames/s, stage split, peak memory."""
    reset_peak()
    gen = FaceGenerator(models.unet, models.vae, mode=mode, max_batch=batch, cudnn_benchmark=cudnn_benchmark)
    result = measure_generator(gen, models, batch)
    del gen
    return result


def render_once(models, template, features, frames, out: Path, **settings) -> dict:
    reset_peak()
    cpu = cpu_seconds()
    result = render_chunk(models, template, features, 0, frames, out, RenderSettings(**settings))
    d = result.timings.to_dict()
    d["peak_gpu_gb"] = peak_gb()
    d["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda() else 0.0
    d["cpu_cores_busy"] = round((cpu_seconds() - cpu) / result.timings.total, 1)
    out.unlink(missing_ok=True)
    return d


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def diff_stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "max": int(d.max()),
        "mean": round(float(d.mean()), 5),
        "frac_gt0": round(float((d > 0).mean()), 6),
    }


def png_dir_stats(a: Path, b: Path) -> dict:
    names = sorted(p.name for p in a.glob("*.png"))
    if names != sorted(p.name for p in b.glob("*.png")) or not names:
        raise RuntimeError(f"frame sets differ: {len(names)} vs {len(list(b.glob('*.png')))}")
    stats = [diff_stats(cv2.imread(str(a / n)), cv2.imread(str(b / n))) for n in names]
    return {
        "frames": len(names),
        "max": max(s["max"] for s in stats),
        "mean": round(statistics.mean(s["mean"] for s in stats), 5),
        "frac_gt0": round(statistics.mean(s["frac_gt0"] for s in stats), 6),
    }


def decoded(path: Path, pixel_format: str = "rgb24") -> np.ndarray:
    """A video's frames, decoded: RGB [n,H,W,3], or packed YUV 4:2:0 [n,H·3/2,W] with "yuv420p"."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format=pixel_format) for f in container.decode(video=0)])


def psnr_db(frames: Iterable[np.ndarray], expected: Iterable[np.ndarray]) -> float:
    """PSNR of ``frames`` against ``expected`` (uint8, frame by frame, same shapes)."""
    mse = np.mean([np.mean((a.astype(np.float32) - b) ** 2) for a, b in zip(frames, expected, strict=True)])
    return round(float(10 * np.log10(255**2 / max(mse, 1e-9))), 2)


def swscale_yuv(rgb: np.ndarray) -> np.ndarray:
    """What ``SegmentWriter.write`` (the reference path) hands x264 for an RGB frame."""
    frame = VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p",
        dst_colorspace="itu709",
        dst_color_range="MPEG",
        interpolation=Interpolation.BILINEAR | Interpolation.ACCURATE_RND,
    )
    return frame.to_ndarray()


def packed_yuv(frame: np.ndarray) -> np.ndarray:
    """An RGB frame as the fast path hands it to x264: converted by ``yuv.py``, packed ``[H·3/2, W]``."""
    return i420(*(p.numpy() for p in rgb_to_yuv420(torch.from_numpy(frame))))


def child_failure(kind: str, stderr: str, logs: Path) -> str:
    """Keep a failed child's whole stderr in ``logs`` (beside the report); name its exception (warnings
    come last)."""
    log = logs / f"child-{kind}-stderr.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(stderr)
    errors = [line for line in stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return f"{errors[-1] if errors else kind + ' child failed'} (stderr in {log.name})"


def work_dir(prefix: str, engines: Path | None) -> Path:
    """A fresh working directory, made this process's ``$MUSETALK_CACHE``; with the AOT ``engines`` of an
    earlier run copied in, so that they are found instead of built."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["MUSETALK_CACHE"] = str(work / "cache")
    if engines:
        shutil.copytree(engines, work / "cache" / "engines")
    return work


def module_command(module: str, *args: object, python_flags: tuple[str, ...] = ()) -> list[str]:
    """The command line of ``python -m module args``; run it with ``cwd=ROOT`` so that ``bench`` and the
    project's packages are found however this process was started."""
    return [sys.executable, *python_flags, "-m", module, *map(str, args)]


def parser(module: str, description: str, sections: Iterable[str]) -> argparse.ArgumentParser:
    """The options every benchmark (``python -m module``) takes; ``sections``: the names ``--sections``
    may give."""
    names = list(sections)

    def section_list(value: str) -> list[str]:
        chosen = value.split(",")
        unknown = sorted(set(chosen) - set(names) - set(ALWAYS))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown section(s) {', '.join(unknown)}; known: {', '.join(names)}"
            )
        return chosen

    p = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--frames", type=int, default=1000, help="frames per chunk (40 s of speech at 25 fps)")
    p.add_argument("--batch", type=int, default=20, help="render batch size (default: the official 20)")
    p.add_argument("--budget", type=float, default=540, help="seconds; the sections left are skipped")
    p.add_argument("--quick", action="store_true", help="CPU smoke run with the demo-size models")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")), help="report folder")
    p.add_argument("--sections", type=section_list, help="comma-separated: " + ",".join(names))
    p.add_argument("--engines", type=Path, help="AOT engines of an earlier run (its OUT/engines) to reuse")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p


class Bench:
    """The inputs every benchmark renders: full-size random-weight models (demo-size with ``--quick``),
    the 512² and 1080p templates prepared with manual face boxes, and speech-like audio (40 s for the
    chunks, 3 s for cold starts); sections of a subclass run through ``report.run``."""

    def __init__(self, args: argparse.Namespace, work: Path, report: Report) -> None:
        self.args, self.work, self.report, self.r = args, work, report, report.data
        self.batch = args.batch
        self.modes = ["graphs", "eager"] if cuda() else ["eager"]
        self.models_root = work / "models"

    def record_env(self, **extra: object) -> None:
        self.r["env"] = {
            "device": torch.cuda.get_device_name() if cuda() else "cpu",
            "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)),
            **extra,
        }
        print(json.dumps(self.r["env"]), flush=True)

    def setup(self, s: dict) -> None:
        if self.args.quick:
            from musetalk_ops.models.demo import write_demo_models

            write_demo_models(self.models_root)
        else:
            s["write_models_s"] = assets.write_models(self.models_root, self.work / "cache")
        self.sources = assets.write_sources(self.work)
        self.wav = assets.write_speech_like(self.work / "speech.wav", self.args.frames / 25 + 0.02)
        self.short_wav = assets.write_speech_like(self.work / "short.wav", 3.02, seed=1)

    def prepare(self, s: dict) -> None:
        png, video = self.sources
        self.prepared = {}
        for name, source, box in (("512", png, assets.ASTRONAUT_BOX), ("1080p", video, assets.HD_BOX)):
            self.prepared[name], s[name] = assets.prepare(
                source, self.work / f"tpl-{name}", box, self.models_root, f"t{name}"
            )
        self.templates = {name: load_template(path) for name, path in self.prepared.items()}

    def engine(self, s: dict) -> None:
        t = time.perf_counter()
        self.models = load_render_models(RenderSettings(models_root=self.models_root))
        s["load_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        self.features = compute_features(self.models, self.wav)
        s["audio_features_s"] = round(time.perf_counter() - t, 3)
        self.frames = min(self.args.frames, self.features.num_frames(25))
        s["frames"] = self.frames

    def inputs(self) -> None:
        """The sections every run starts with."""
        for name in ALWAYS:
            self.report.run(name, getattr(self, name))

    def render(self, name: str, frames: int | None = None, **settings) -> dict:
        """One chunk of ``frames`` (default ``--frames``) on template ``name``, timed (``render_once``)."""
        t = self.templates[name]
        n = frames or self.frames
        return render_once(
            self.models, t, self.features, n, self.work / "o.mp4", batch_size=self.batch, **settings
        )

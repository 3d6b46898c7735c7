"""Render benchmark: our chunk path vs an official-style baseline, side by side in one run.

Builds full-size random-weight models in the official layout (bench/assets.py), a 512² template (one
image) and a 1920×1080 template (16-frame clip), prepared on the GPU with manual face boxes, and 40 s
of speech-like audio. Then, each section timed and saved as it finishes (a failing section is
recorded and the rest still run), in this order (the last ones are skipped first when ``--budget``
runs out):

* ``ceiling``: measured fp16 matmul rate → physical limit in frames/s at 800 GFLOP/frame, on a cold
  GPU (a burst) and sustained (after ``HOT_SECONDS`` of matmuls: a power-capped GPU lowers its clock);
* ``prepare``: template preparation per stage (issue 3's GPU timing with a manual box);
* ``ours_<template>_<path>``: ``render_chunk`` (features in → encoded H.264 segment out), cold (first
  chunk of the path in the process: capture included) and warm; design.md timing schema, frames/s,
  real-time factor, peak GPU memory (allocated and reserved), CPU cores busy;
* ``baseline_<template>``: bench/baseline.py (eager fp16, batch 20, per-frame PIL paste-back, PNGs,
  then a separate encode);
* ``equality``: device paste vs ``paste_face`` on the GPU's own faces, their YUV (block converted on the
  GPU vs the whole frame, and vs swscale); fast path vs reference path;
* ``oom``: GPU memory capped below what the batch needs: the real out-of-memory fallback, its frames
  vs an undisturbed render at the batch size it settled on;
* ``kill_retry``: a render step process SIGKILLed mid-chunk, run again in a fresh process, its decoded
  frames vs an undisturbed render;
* ``compiled``: the torch.compile path in its own process (cold compile cost, warm chunks, the
  generator alone), then its cold start with the on-disk compile cache warm;
* ``aot`` / ``aot_autotune``: an AOTInductor engine built in its own process (build cost; plain, or
  with Inductor's max-autotune), warm chunks and the generator alone through it, its frames vs the
  reference path's, then cold starts of a render step that loads it (mode ``aot``, and the default
  mode, which finds it);
* ``cold_start``: fresh processes, process start → first frame (3 s clip; the median of
  ``--cold-repeats`` runs), as a render step (features from the audio step: no whisper) on the default
  path and each fast path, and as the CLI (whisper in the process) on the default path; plus one render
  step's ``-X importtime`` profile, ``import torch`` alone, and the default render step again with a
  filled bytecode cache (the condition of an image pip installed torch into);
* ``encoding``: chunks with 2 and 8 encoders and two presets;
* ``encoder_alone``: x264 alone on the templates' frames (segments at once, with and without B-frames,
  presets, RGB vs YUV input; bytes and PSNR);
* ``generator``: UNet + VAE decode alone per path and batch size (here and in ``aot``/``compiled``: a
  batch at a time, then sustained, with the SM clock and power it ran at);
* ``cpu_reference``: the GPU fp16 fast path vs the CPU fp32 reference path on the same frames.

    python bench/bench_render.py [--frames 1000] [--baseline-frames 150] [--batch 20] [--budget 540]
                                 [--sections a,b,...] [--cold-repeats 3] [--engines DIR] [--quick]

Writes ``$OUT/bench.json`` (or ``./bench-out/``) and prints a table; results go to bench/RESULTS.md.
``--quick`` is a CPU smoke run with demo-size models.
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
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

START = time.time()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

CHILD_LOGS = Path(os.environ.get("OUT", "bench-out"))  # main() sets --out
GFLOP_PER_FRAME = 800.0  # UNet 177.8 + VAE decode 622.2 (docs/performance.md)


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
        if self.sections and name not in self.sections and name not in ("setup", "prepare", "engine"):
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


def generator_fps(models, mode: str, batch: int, cudnn_benchmark: bool) -> dict:
    """UNet + VAE decode alone, a new generator for one full bucket: frames/s, stage split, peak memory."""
    from musetalk_ops.generator import FaceGenerator

    reset_peak()
    gen = FaceGenerator(models.unet, models.vae, mode=mode, max_batch=batch, cudnn_benchmark=cudnn_benchmark)
    result = measure_generator(gen, models, batch)
    del gen
    return result


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
    from musetalk_ops.generator import StageClock

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


def render_once(models, template, features, frames, out: Path, **settings) -> dict:
    from musetalk_ops.render.chunks import render_chunk
    from musetalk_ops.render.settings import RenderSettings

    reset_peak()
    cpu = cpu_seconds()
    result = render_chunk(models, template, features, 0, frames, out, RenderSettings(**settings))
    d = result.timings.to_dict()
    d["peak_gpu_gb"] = peak_gb()
    d["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda() else 0.0
    d["cpu_cores_busy"] = round((cpu_seconds() - cpu) / result.timings.total, 1)
    out.unlink(missing_ok=True)
    return d


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


def paste_equality(models, template, batch: int) -> dict:
    """Faces generated on the GPU, pasted on the GPU (device_paste) and on the CPU (paste_face); the
    frame's YUV from the block converted on the GPU vs the whole pasted frame converted on the GPU
    (exact) and by swscale (what the reference path encodes)."""
    from musetalk_ops.audio import add_positional_encoding
    from musetalk_ops.blend import frame_indices, paste_face
    from musetalk_ops.device_paste import DevicePaster
    from musetalk_ops.generator import FaceGenerator, StageClock
    from musetalk_ops.yuv import i420, i420_planes, rgb_to_yuv420

    gen = FaceGenerator(models.unet, models.vae, mode="eager", max_batch=batch)
    ks = frame_indices(0, batch, len(template.frames), template.cycle)
    lat = template.latents[torch.from_numpy(ks)].to(models.device, models.dtype)
    tok = add_positional_encoding(torch.randn(batch, 50, 384, device=models.device, dtype=models.dtype))
    faces = gen(lat, tok, StageClock(models.device))
    paster = DevicePaster(template, models.device)
    paster.load(ks)
    host_faces = faces.cpu().numpy()
    rgb = {"max": 0, "pixels_differing": 0, "pixels": 0}
    yuv_block = {"max": 0, "values_differing": 0, "values": 0}
    yuv_swscale = {"max": 0, "values_differing": 0, "values": 0}
    composited = paster.composite(faces, ks)
    canvas = composited.canvas.cpu().numpy()
    planes = [p.cpu().numpy() for p in rgb_to_yuv420(composited.canvas, context=True)]
    for j, (k, plan) in enumerate(zip(ks.tolist(), composited.plans, strict=True)):
        f, frame = template.faces[k], template.frames[k]
        (x1, y1, x2, y2), (bx1, by1, bx2, by2) = plan.region, plan.block
        expected = paste_face(frame, host_faces[j], f.face_box, template.masks[k], f.crop_box)
        got = frame.copy()
        got[y1:y2, x1:x2] = canvas[j, 1 + y1 - by1 : 1 + y2 - by1, x1 - bx1 : x2 - bx1]
        d = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        rgb["max"] = max(rgb["max"], int(d.max()))
        rgb["pixels_differing"] += int((d > 0).any(axis=2).sum())
        rgb["pixels"] += d.shape[0] * d.shape[1]
        height, width = by2 - by1, bx2 - bx1
        yuv = paster.background(k)
        luma, u, v = i420_planes(yuv)
        luma[by1:by2, bx1:bx2] = planes[0][j, :height, :width]
        u[by1 // 2 : by2 // 2, bx1 // 2 : bx2 // 2] = planes[1][j, : height // 2, : width // 2]
        v[by1 // 2 : by2 // 2, bx1 // 2 : bx2 // 2] = planes[2][j, : height // 2, : width // 2]
        whole = i420(*(p.cpu().numpy() for p in rgb_to_yuv420(torch.from_numpy(expected).to(models.device))))
        for stats, reference in ((yuv_block, whole), (yuv_swscale, swscale_yuv(expected))):
            d = np.abs(yuv.astype(np.int16) - reference.astype(np.int16))
            stats["max"] = max(stats["max"], int(d.max()))
            stats["values_differing"] += int((d > 0).sum())
            stats["values"] += d.size
    return {"rgb_vs_paste_face": rgb, "yuv_block_vs_whole_frame": yuv_block, "yuv_vs_swscale": yuv_swscale}


def swscale_yuv(rgb: np.ndarray) -> np.ndarray:
    """What ``SegmentWriter.write`` (the reference path) hands x264 for an RGB frame."""
    from av.video.frame import VideoFrame
    from av.video.reformatter import Interpolation

    frame = VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p",
        dst_colorspace="itu709",
        dst_color_range="MPEG",
        interpolation=Interpolation.BILINEAR | Interpolation.ACCURATE_RND,
    )
    return frame.to_ndarray()


def run_child(kind: str, *args) -> tuple[dict, float]:
    """This script in a fresh interpreter (``--child KIND ...``); its last stdout line is JSON."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(child_failure(kind, proc.stderr))
    return json.loads(proc.stdout.strip().splitlines()[-1]), started


def child_failure(kind: str, stderr: str) -> str:
    """Keep a failed child's whole stderr beside the report; name its exception (warnings come last)."""
    log = CHILD_LOGS / f"child-{kind}-stderr.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(stderr)
    errors = [line for line in stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return f"{errors[-1] if errors else kind + ' child failed'} (stderr in {log.name})"


def cold_start(
    mode: str,
    batch: int,
    models_root: Path,
    cache: Path,
    wav: Path,
    out: Path,
    *features: Path,
    repeats: int = 1,
    env: dict | None = None,
) -> dict:
    """Fresh interpreters render a short clip (bench/cold_start.py, which imports only what a render
    needs); process start → first frame handed to the encoder. With ``repeats`` > 1 the median run is
    reported (the imports alone vary by a second between runs on the lent machines), with every run's time.
    """
    runs = []
    for _ in range(repeats):
        started = time.time()
        proc = cold_start_process(mode, batch, models_root, cache, wav, out, *features, env=env)
        if proc.returncode != 0:
            raise RuntimeError(child_failure(f"cold-start-{mode}", proc.stderr))
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        marks = {k: round(v - started, 3) for k, v in result.pop("marks").items()}
        runs.append({"first_frame_s": marks["first_frame"], "marks_since_process_start": marks, **result})
    runs.sort(key=lambda run: run["first_frame_s"])
    return {**runs[len(runs) // 2], "runs_first_frame_s": [run["first_frame_s"] for run in runs]}


def import_profile(batch: int, models_root: Path, cache: Path, wav: Path, out: Path, features: Path) -> None:
    """One render step's ``-X importtime`` report, kept beside the report (not timed: it slows imports)."""
    proc = cold_start_process(
        "default", batch, models_root, cache, wav, out, features, python_flags=("-X", "importtime")
    )
    (CHILD_LOGS / "importtime-render-step.log").write_text(proc.stderr)


BYTECODE = """
import json, os, sys, torch
d = os.path.join(os.path.dirname(torch.__file__), "__pycache__")
print(json.dumps({"dont_write_bytecode": sys.flags.dont_write_bytecode, "torch_pycache": os.path.isdir(d),
                  "torch_pyc_files": len(os.listdir(d)) if os.path.isdir(d) else 0,
                  "torch_dir_writable": os.access(os.path.dirname(torch.__file__), os.W_OK)}))
"""


def bytecode_cache_env() -> dict:
    """This environment with bytecode written to (and read from) a new empty cache directory."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**base, "PYTHONPYCACHEPREFIX": tempfile.mkdtemp(prefix="pycache-")}


def import_torch_seconds(repeats: int = 3) -> dict:
    """``import torch`` alone in fresh interpreters, as the machine is and with a writable bytecode
    cache (``PYTHONPYCACHEPREFIX``, bytecode writing on; its first run fills it): whether torch's
    modules are compiled on every import here, as they are not in an image pip installed torch into."""
    timer = "import time; t = time.time(); import torch; print(time.time() - t)"

    def last_line(code: str, env: dict) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        return proc.stdout.strip().splitlines()[-1]

    out = {"bytecode": json.loads(last_line(BYTECODE, dict(os.environ)))}
    for name, env in (("as_is", dict(os.environ)), ("pycache_prefix", bytecode_cache_env())):
        out[name] = [round(float(last_line(timer, env)), 2) for _ in range(repeats)]
    return out


def cold_start_process(
    mode: str, batch: int, *paths: Path, python_flags: tuple[str, ...] = (), env: dict | None = None
) -> subprocess.CompletedProcess:
    """bench/cold_start.py in a fresh interpreter (see its docstring for the arguments)."""
    script = str(Path(__file__).parent / "cold_start.py")
    return subprocess.run(
        [sys.executable, *python_flags, script, mode, str(batch), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )


def compiled_child(models_root: str, cache_512: str, cache_hd: str, wav: str, work: str, batch: str) -> None:
    """The compiled path in its own process: a compiler failure cannot disturb the other sections, and
    the first chunk pays a cold compile as the first process on a new GPU type would."""
    from musetalk_ops.render.fast import cached_generator
    from musetalk_ops.render.models import compute_features, load_render_models
    from musetalk_ops.render.settings import RenderSettings
    from musetalk_ops.template_cache import load_template

    models = load_render_models(RenderSettings(models_root=Path(models_root)))
    features = compute_features(models, Path(wav))
    frames, batch_size = features.num_frames(25), int(batch)
    templates = {"512": load_template(cache_512), "1080p": load_template(cache_hd)}
    out, r = Path(work) / "compiled.mp4", {}
    t = time.perf_counter()
    r["512_cold"] = render_once(
        models, templates["512"], features, frames, out, batch_size=batch_size, mode="compiled"
    )
    r["first_chunk_s"] = round(time.perf_counter() - t, 1)
    for name, template in templates.items():
        r[f"{name}_warm"] = render_once(
            models, template, features, frames, out, batch_size=batch_size, mode="compiled"
        )
    gen = cached_generator(models.unet, models.vae, "compiled", batch_size)
    r["generator_build_s"] = round(gen.build_seconds, 1)
    r["generator"] = measure_generator(gen, models, batch_size)
    print(json.dumps(r))


def aot_child(
    models_root: str, cache_512: str, cache_hd: str, wav: str, work: str, batch: str, autotune: str
) -> None:
    """Build an AOTInductor engine (musetalk_ops/engine/) in its own process, then render through it."""
    from musetalk_ops.engine.spec import engine_specs, find_engine_for, find_step
    from musetalk_ops.render.chunks import render_chunk
    from musetalk_ops.render.fast import cached_generator, release_gpu_memory
    from musetalk_ops.render.models import compute_features, load_render_models
    from musetalk_ops.render.settings import RenderSettings
    from musetalk_ops.template_cache import load_template

    def say(message: str) -> None:  # progress on stderr: kept beside the report if the child fails
        print(f"[aot child {time.time() - START:.0f} s] {message}", file=sys.stderr, flush=True)

    models = load_render_models(RenderSettings(models_root=Path(models_root)))
    features = compute_features(models, Path(wav))
    frames, batch_size = features.num_frames(25), int(batch)
    t = time.perf_counter()
    specs = engine_specs(models.unet, models.vae, batch_size, autotune=autotune == "1")
    reused = [name for name, spec in specs.items() if find_step(spec) is not None]
    # As a deployment builds it: the CLI, its missing steps side by side in their own processes
    build = ["engine", "build", "--models", models_root, "--batch-size", str(batch_size)]
    subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *build, *["--autotune"] * (autotune == "1")], check=True
    )
    paths = find_engine_for(models.unet, models.vae, batch_size)
    r = {
        "build_s": round(time.perf_counter() - t, 1),
        "engine": {name: path.name for name, path in paths.items()},
        "steps_reused": reused,
    }
    say(f"engine ready: {r}")
    r["engine_mb"] = round(sum(f.stat().st_size for p in paths.values() for f in p.iterdir()) / 2**20, 1)
    templates = {"512": load_template(cache_512), "1080p": load_template(cache_hd)}
    out = Path(work) / "aot.mp4"
    r["512_cold"] = render_once(
        models, templates["512"], features, frames, out, batch_size=batch_size, mode="aot"
    )
    say("first chunk done")
    for name, template in templates.items():
        r[f"{name}_warm"] = render_once(
            models, template, features, frames, out, batch_size=batch_size, mode="aot"
        )
    say("warm chunks done")
    gen = cached_generator(models.unet, models.vae, "aot", batch_size)
    r["generator_load_s"] = round(gen.build_seconds, 2)
    r["generator"] = measure_generator(gen, models, batch_size)
    release_gpu_memory()
    r["generator_cudnn_benchmark"] = generator_fps(models, "aot", batch_size, True)
    n, dirs = min(40, frames), []
    for mode in ("aot", "reference"):
        settings = RenderSettings(batch_size=batch_size, mode=mode)
        d = Path(work) / f"aot-eq-{mode}"
        render_chunk(models, templates["1080p"], features, 0, n, out, settings, frames_dir=d)
        dirs.append(d)
    r["aot_vs_reference_1080p"] = png_dir_stats(*dirs)
    print(json.dumps(r))


def chunk_child(models_root: str, cache: str, features_file: str, frames: str, out: str) -> None:
    """A render step in its own process: features from a file, frames [0, frames) into ``out``; touches
    ``out``.started once its first frame is encoded (the parent kills it after that)."""
    from musetalk_ops.audio import AudioFeatures
    from musetalk_ops.render.chunks import render_chunk
    from musetalk_ops.render.models import load_render_models
    from musetalk_ops.render.settings import RenderSettings
    from musetalk_ops.template_cache import load_template

    template = load_template(cache)
    settings = RenderSettings(models_root=Path(models_root))
    models = load_render_models(settings, version=template.version, components=("unet", "vae"))
    started = Path(out + ".started")

    def progress(_n: int) -> None:
        started.touch()

    features = AudioFeatures.load(Path(features_file))
    render_chunk(models, template, features, 0, int(frames), Path(out), settings, on_frames=progress)
    print(json.dumps({"done": True}))


def decoded(path: Path, pixel_format: str = "rgb24") -> np.ndarray:
    """A video's frames, decoded: RGB [n,H,W,3], or packed YUV 4:2:0 [n,H·3/2,W] with "yuv420p"."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format=pixel_format) for f in container.decode(video=0)])


def psnr_db(frames: Iterable[np.ndarray], expected: Iterable[np.ndarray]) -> float:
    """PSNR of ``frames`` against ``expected`` (uint8, frame by frame, same shapes)."""
    mse = np.mean([np.mean((a.astype(np.float32) - b) ** 2) for a, b in zip(frames, expected, strict=True)])
    return round(float(10 * np.log10(255**2 / max(mse, 1e-9))), 2)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def encode_alone(
    frames: np.ndarray, count: int, writers: int, directory: Path, preset: str, yuv: bool, bframes: int = 0
) -> dict:
    """x264 alone on the template's own frames (ping-pong), ``writers`` segments at once; ``yuv``: frames
    handed over already converted (``write_yuv``, as the fast path does), else RGB converted by
    swscale on the encoder threads (``write``, the reference path). Bytes per frame and the PSNR of
    the first segment's decoded YUV against its input say what a setting costs in quality."""
    from musetalk_ops.blend import frame_indices
    from musetalk_ops.video import SegmentWriter

    per = count // writers
    order = frame_indices(0, per, len(frames), "pingpong")
    height, width = frames.shape[1:3]
    t = time.perf_counter()
    converted = [swscale_yuv(f) for f in frames]
    convert_ms = (time.perf_counter() - t) / len(frames) * 1000
    if yuv:
        converted = [packed_yuv(f) for f in frames]
    paths = [directory / f"enc{n}.mp4" for n in range(writers)]

    def run(n: int) -> None:
        with SegmentWriter(paths[n], 25, width, height, preset=preset, bframes=bframes) as writer:
            for k in order:
                if yuv:
                    writer.write_yuv(converted[k])
                else:
                    writer.write(frames[k])

    t, cpu = time.perf_counter(), cpu_seconds()
    threads = [threading.Thread(target=run, args=(n,)) for n in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    return {
        "fps": round(per * writers / seconds, 1),
        "cpu_cores_busy": round(cpu / seconds, 1),
        "kbytes_per_frame": round(paths[0].stat().st_size / per / 1024, 2),
        "psnr_yuv_db": psnr_db(decoded(paths[0], "yuv420p"), (converted[k] for k in order)),
        "swscale_rgb_to_yuv_ms_one_thread": round(convert_ms, 2),
    }


def work_dir(prefix: str, engines: Path | None) -> Path:
    """A fresh working directory, made this process's ``$MUSETALK_CACHE``; with the AOT ``engines`` of an
    earlier run copied in, so that they are found instead of built."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["MUSETALK_CACHE"] = str(work / "cache")
    if engines:
        shutil.copytree(engines, work / "cache" / "engines")
    return work


def packed_yuv(frame: np.ndarray) -> np.ndarray:
    """An RGB frame as the fast path hands it to x264: converted by ``yuv.py``, packed ``[H·3/2, W]``."""
    from musetalk_ops.yuv import i420, rgb_to_yuv420

    return i420(*(p.numpy() for p in rgb_to_yuv420(torch.from_numpy(frame))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames per chunk of our path")
    parser.add_argument("--baseline-frames", type=int, default=150)
    parser.add_argument("--batch", type=int, default=20, help="render batch size (the official default)")
    parser.add_argument("--budget", type=float, default=540, help="seconds; later sections are skipped")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with demo-size models")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per cold start (median)")
    parser.add_argument(
        "--cold-batches",
        type=lambda v: [int(b) for b in v.split(",")],
        default=[],
        help="cold_start: the render step's default path also at these batch sizes (bytecode cached)",
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument(
        "--sections", type=lambda v: v.split(","), help="comma-separated section names to run"
    )
    parser.add_argument(
        "--engines", type=Path, help="AOT engines of an earlier run (its $OUT/engines) to reuse"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        children = {"compiled": compiled_child, "chunk": chunk_child, "aot": aot_child}
        children[args.child[0]](*args.child[1:])
        return
    global CHILD_LOGS
    CHILD_LOGS = args.out
    work = work_dir("musetalk-bench-", args.engines)
    report = Report(args.out, args.budget, sys.argv, args.sections)
    Bench(args, work, report).run()
    print_table(report.data)
    report.save()


class Bench:
    """The sections, in order of importance (later ones are the first to be skipped)."""

    def __init__(self, args: argparse.Namespace, work: Path, report: Report) -> None:
        self.args, self.work, self.report, self.r = args, work, report, report.data
        self.batch = args.batch
        self.modes = ["graphs", "eager"] if cuda() else ["eager"]
        self.models_root = work / "models"

    def run(self) -> None:
        sys.path.insert(0, str(Path(__file__).parent))
        self.r["env"] = {
            "device": torch.cuda.get_device_name() if cuda() else "cpu",
            "torch": torch.__version__,
            "cv2": cv2.__version__,
            "cpus": len(os.sched_getaffinity(0)),
            "frames": self.args.frames,
            "batch": self.batch,
        }
        print(json.dumps(self.r["env"]), flush=True)
        run = self.report.run
        run("ceiling", self.ceiling)
        run("setup", self.setup)
        run("prepare", self.prepare)
        run("engine", self.engine)
        for name in self.templates:
            for mode in self.modes:
                run(f"ours_{name}_{mode}", lambda s, n=name, m=mode: self.ours(s, n, m), needs=30)
        for name in self.templates:
            run(f"baseline_{name}", lambda s, n=name: self.baseline(s, n), needs=50)
        run("equality", self.equality, needs=30)
        if cuda():
            run("oom", self.oom, needs=30)
            run("kill_retry", self.kill_retry, needs=40)
        if cuda():
            run("compiled", self.compiled, needs=200)
        run("aot", lambda s: self.aot(s, False), needs=150)
        if cuda():
            run("aot_autotune", lambda s: self.aot(s, True), needs=300)
        run("cold_start", self.cold_starts, needs=45)
        run("encoding", self.encoding, needs=40)
        run("encoder_alone", self.encoder_alone, needs=60)
        run("generator", self.generator, needs=20)
        if cuda():
            run("cpu_reference", self.cpu_reference, needs=15)

    def ceiling(self, s: dict) -> None:
        if cuda():
            s["fp16_matmul_tflops"] = round(matmul_tflops(), 1)
            s["limit_fps"] = round(s["fp16_matmul_tflops"] * 1000 / GFLOP_PER_FRAME, 1)
            with GpuClock() as gpu:
                s["fp16_matmul_tflops_sustained"] = round(matmul_tflops(hot=True), 1)
            s["sustained_gpu"] = gpu.summary
            s["limit_fps_sustained"] = round(s["fp16_matmul_tflops_sustained"] * 1000 / GFLOP_PER_FRAME, 1)

    def setup(self, s: dict) -> None:
        import assets

        if self.args.quick:
            from musetalk_ops.models.demo import write_demo_models

            write_demo_models(self.models_root)
        else:
            s["write_models_s"] = assets.write_models(self.models_root, self.work / "cache")
        self.sources = assets.write_sources(self.work)
        self.wav = assets.write_speech_like(self.work / "speech.wav", self.args.frames / 25 + 0.02)
        self.short_wav = assets.write_speech_like(self.work / "short.wav", 3.02, seed=1)

    def prepare(self, s: dict) -> None:
        import assets

        from musetalk_ops.template_cache import load_template

        png, video = self.sources
        self.prepared = {}
        for name, source, box in (("512", png, assets.ASTRONAUT_BOX), ("1080p", video, assets.HD_BOX)):
            self.prepared[name], s[name] = assets.prepare(
                source, self.work / f"tpl-{name}", box, self.models_root, f"t{name}"
            )
        self.templates = {name: load_template(path) for name, path in self.prepared.items()}

    def engine(self, s: dict) -> None:
        from musetalk_ops.render.models import compute_features, load_render_models
        from musetalk_ops.render.settings import RenderSettings

        t = time.perf_counter()
        self.models = load_render_models(RenderSettings(models_root=self.models_root))
        s["load_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        self.features = compute_features(self.models, self.wav)
        s["audio_features_s"] = round(time.perf_counter() - t, 3)
        self.frames = min(self.args.frames, self.features.num_frames(25))
        s["frames"] = self.frames

    def render(self, name: str, frames: int | None = None, **settings) -> dict:
        t = self.templates[name]
        n = frames or self.frames
        return render_once(
            self.models, t, self.features, n, self.work / "o.mp4", batch_size=self.batch, **settings
        )

    def ours(self, s: dict, name: str, mode: str) -> None:
        from musetalk_ops.render.fast import cached_generator

        cached_generator.cache_clear()  # each path's memory and one-off costs on their own
        s["cold"] = self.render(name, mode=mode)  # first chunk of this path in the process
        s["warm"] = self.render(name, mode=mode)
        self.r.setdefault("ours", {})[f"{name}/{mode}"] = s

    def baseline(self, s: dict, name: str) -> None:
        from baseline import OfficialAvatar, encode_pngs, official_models, run_baseline

        avatar = OfficialAvatar(self.templates[name], self.models)
        official = official_models(self.models_root, self.models)
        n = min(self.args.baseline_frames, self.frames)
        run_baseline(official, avatar, self.features, 25, min(40, n), None)  # warm-up (cuDNN, allocator)
        pngs = self.work / f"png-{name}"
        pngs.mkdir()
        loop = run_baseline(official, avatar, self.features, 25, n, pngs)
        encode = encode_pngs(pngs, self.work / "b.mp4", 25, 18, "veryfast")
        skip = run_baseline(official, avatar, self.features, 25, n, None)
        s.update(frames=n, loop_with_png_s=round(loop, 3), encode_pngs_s=round(encode, 3))
        s.update(fps_end_to_end=round(n / (loop + encode), 2), fps_with_png=round(n / loop, 2))
        s.update(fps_skip_save=round(n / skip, 2))

    def equality(self, s: dict) -> None:
        from musetalk_ops.render.chunks import render_chunk
        from musetalk_ops.render.settings import RenderSettings

        n = min(40, self.frames)
        for name, template in self.templates.items():
            s[f"paste_{name}"] = paste_equality(self.models, template, self.batch)
            dirs = []
            for mode in (self.modes[0], "reference"):
                d = self.work / f"eq-{name}-{mode}"
                settings = RenderSettings(batch_size=self.batch, mode=mode)
                render_chunk(
                    self.models, template, self.features, 0, n, self.work / "e.mp4", settings, frames_dir=d
                )
                dirs.append(d)
            s[f"fast_vs_reference_{name}"] = png_dir_stats(*dirs)

    def cold_starts(self, s: dict) -> None:
        """Render step (features from the audio step) per path, the default one first; the CLI (whisper in
        the process) on the default path."""
        from musetalk_ops.render.models import compute_features

        step_features = self.work / "short-features.safetensors"
        compute_features(self.models, self.short_wav).save(step_features)
        args = (self.batch, self.models_root, self.prepared["512"], self.short_wav, self.work / "c.mp4")
        for mode in ("default", *self.modes):
            s[f"{mode}/render_step"] = cold_start(mode, *args, step_features, repeats=self.args.cold_repeats)
        s["default/cli"] = cold_start("default", *args, repeats=self.args.cold_repeats)
        import_profile(*args, step_features)
        s["import_torch"] = import_torch_seconds()
        # As in an image whose installer compiled every module's bytecode (pip does; k8s/Dockerfile):
        # a bytecode cache filled by one untimed run first.
        cached = bytecode_cache_env()
        cold_start_process("default", *args, step_features, env=cached)
        s["default/render_step/bytecode_cached"] = cold_start(
            "default", *args, step_features, repeats=self.args.cold_repeats, env=cached
        )
        for batch in self.args.cold_batches:  # the same at other batch sizes (their engines found or not)
            s[f"default/render_step/bytecode_cached/b{batch}"] = cold_start(
                "default", batch, *args[1:], step_features, repeats=self.args.cold_repeats, env=cached
            )

    def generator(self, s: dict) -> None:
        sizes = {"graphs": (8, 20, 48), "eager": (20, 48)} if cuda() else {"eager": (4,)}
        for mode, batches in sizes.items():
            for b in sorted({*batches, self.batch}):  # and the render batch size
                s[f"{mode}/b{b}"] = generator_fps(self.models, mode, b, False)

    def encoder_alone(self, s: dict) -> None:
        """x264 alone: P-only (the default) vs x264's 3 B-frames, segments at once, presets."""
        frames = self.templates["1080p"].frames
        runs = [("veryfast", 4, False, 0)]
        runs += [("veryfast", n, True, b) for n in (4, 8, 16) for b in (0, 3)]
        runs += [("superfast", 8, True, 0)]
        for preset, writers, yuv, bframes in runs:
            key = f"1080p/{preset}/x{writers}/b{bframes}" + ("/yuv_input" if yuv else "")
            s[key] = encode_alone(frames, 480, writers, self.work, preset, yuv, bframes)
            print(key, s[key], flush=True)
        for bframes in (0, 3):  # the single-image 512² template: a static frame but for the mouth
            s[f"512/veryfast/x4/b{bframes}/yuv_input"] = encode_alone(
                self.templates["512"].frames, 1200, 4, self.work, "veryfast", True, bframes
            )

    def encoding(self, s: dict) -> None:
        """Whole chunks with other encoder counts and presets than the default."""
        for name in self.templates:
            for encoders in (2, 8):
                for preset in ("veryfast", "superfast"):
                    s[f"{name}/{preset}/encoders{encoders}"] = self.render(
                        name, mode=self.modes[0], encoders=encoders, preset=preset
                    )

    def oom(self, s: dict) -> None:
        """The real CUDA out-of-memory path: cap this process's GPU memory so that the batch does not fit,
        render, and compare with an undisturbed render at the batch size the fallback settled on."""
        from musetalk_ops.render.chunks import render_chunk
        from musetalk_ops.render.fast import release_gpu_memory
        from musetalk_ops.render.settings import RenderSettings

        template, n = self.templates["512"], min(120, self.frames)
        release_gpu_memory()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = torch.cuda.memory_allocated() + int(1.2 * 2**30)
        s["cap_gb"] = round(cap / 2**30, 2)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        told: list[str] = []
        try:
            squeezed = render_chunk(
                self.models,
                template,
                self.features,
                0,
                n,
                self.work / "oom.mp4",
                RenderSettings(batch_size=self.batch),
                frames_dir=self.work / "oom-squeezed",
                on_retry=told.append,
            )
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            release_gpu_memory()
        s["retries"] = told
        s["final_batch"], s["final_mode"] = squeezed.timings.batch_size, squeezed.timings.mode
        s["frames"] = squeezed.frames
        render_chunk(
            self.models,
            template,
            self.features,
            0,
            n,
            self.work / "calm.mp4",
            RenderSettings(batch_size=squeezed.timings.batch_size),
            frames_dir=self.work / "oom-calm",
        )
        s["squeezed_vs_undisturbed"] = png_dir_stats(self.work / "oom-squeezed", self.work / "oom-calm")

    def kill_retry(self, s: dict) -> None:
        """Issue 8 on the GPU: a render step process SIGKILLed mid-chunk, then run again in a fresh process
        (what the RetryPolicy does); its segment's decoded frames vs an undisturbed render of this process."""
        from musetalk_ops.audio import AudioFeatures
        from musetalk_ops.render.chunks import render_chunk
        from musetalk_ops.render.models import compute_features
        from musetalk_ops.render.settings import RenderSettings

        n, cache = min(200, self.frames), self.prepared["1080p"]
        features = self.work / "kill-features.safetensors"
        compute_features(self.models, self.wav).save(features)
        out = self.work / "killed.mp4"
        args = [sys.executable, __file__, "--child", "chunk", self.models_root, cache, features, n, out]
        victim = subprocess.Popen(
            [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started = Path(f"{out}.started")
        t = time.time()
        while not started.exists() and victim.poll() is None and time.time() - t < 120:
            time.sleep(0.05)
        victim.kill()
        victim.wait()
        s["killed_after_first_frame"] = started.exists()
        s["segment_left_by_killed_process"] = out.exists()
        started.unlink(missing_ok=True)
        run_child("chunk", self.models_root, cache, features, n, out)
        # The undisturbed render as production makes it (a fresh step process), and one in this long-lived
        # process, whose memory state can lead cuDNN to other convolution algorithms.
        fresh, here = self.work / "calm-fresh.mp4", self.work / "calm-here.mp4"
        run_child("chunk", self.models_root, cache, features, n, fresh)
        settings = RenderSettings(batch_size=self.batch)
        render_chunk(self.models, self.templates["1080p"], AudioFeatures.load(features), 0, n, here, settings)
        a, b, c = decoded(out), decoded(fresh), decoded(here)
        s["frames"] = [len(a), len(b), len(c)]
        s["retry_vs_undisturbed_fresh_process_decoded"] = diff_stats(a, b)
        s["retry_vs_undisturbed_bench_process_decoded"] = diff_stats(a, c)

    def compiled(self, s: dict) -> None:
        result, _ = run_child(
            "compiled",
            self.models_root,
            self.prepared["512"],
            self.prepared["1080p"],
            self.wav,
            self.work,
            self.batch,
        )
        s.update(result)
        for name in self.templates:
            self.r.setdefault("ours", {})[f"{name}/compiled"] = {
                "warm": s[f"{name}_warm"],
                "cold": s["512_cold"],
            }
        s["cold_start_warm_cache"] = cold_start(
            "compiled",
            self.batch,
            self.models_root,
            self.prepared["512"],
            self.short_wav,
            self.work / "cc.mp4",
        )

    def aot(self, s: dict, autotune: bool) -> None:
        from musetalk_ops.render.models import compute_features

        args = (self.prepared["512"], self.prepared["1080p"], self.wav, self.work, self.batch, int(autotune))
        result, _ = run_child("aot", self.models_root, *args)
        s.update(result)
        # Kept with the report: a later run given --engines reuses it instead of building again
        for package in s["engine"].values():
            shutil.copytree(self.work / "cache" / "engines" / package, self.args.out / "engines" / package)
        path = "aot_autotune" if autotune else "aot"
        for name in self.templates:
            self.r.setdefault("ours", {})[f"{name}/{path}"] = {
                "warm": s[f"{name}_warm"],
                "cold": s["512_cold"],
            }
        features = self.work / "short-features.safetensors"
        compute_features(self.models, self.short_wav).save(features)
        for mode in ("aot", "default"):
            s[f"cold_start_{mode}/render_step"] = cold_start(
                mode,
                self.batch,
                self.models_root,
                self.prepared["512"],
                self.short_wav,
                self.work / "ac.mp4",
                features,
                repeats=self.args.cold_repeats,
            )

    def cpu_reference(self, s: dict) -> None:
        from musetalk_ops.render.chunks import render_chunk
        from musetalk_ops.render.models import compute_features, load_render_models
        from musetalk_ops.render.settings import RenderSettings

        cpu_models = load_render_models(
            RenderSettings(models_root=self.models_root, device="cpu", dtype="float32")
        )
        cpu_features = compute_features(cpu_models, self.wav)
        n, template = 4, self.templates["512"]
        a, b = self.work / "cpu-gpu", self.work / "cpu-cpu"
        render_chunk(
            self.models,
            template,
            self.features,
            0,
            n,
            self.work / "g.mp4",
            RenderSettings(batch_size=n),
            frames_dir=a,
        )
        t = time.perf_counter()
        settings = RenderSettings(batch_size=n, device="cpu", dtype="float32")
        render_chunk(cpu_models, template, cpu_features, 0, n, self.work / "r.mp4", settings, frames_dir=b)
        s["cpu_seconds_per_frame"] = round((time.perf_counter() - t) / n, 2)
        s["gpu_fp16_graphs_vs_cpu_fp32_reference_512"] = png_dir_stats(a, b)


def print_generators(r: dict, ceiling: dict) -> None:
    """UNet + VAE alone per path: a cold GPU's burst and, where measured, the sustained rate of a hot,
    power-capped one; each as a share of the limit measured the same way."""
    rows = {
        f"{path} (cuDNN autotuning)" if key.endswith("cudnn_benchmark") else path: g
        for path in ("aot", "compiled")
        for key, g in r.get(path, {}).items()
        if key.startswith("generator") and isinstance(g, dict)
    }
    rows |= {key: g for key, g in r.get("generator", {}).items() if isinstance(g, dict) and "fps" in g}
    if not rows:
        return

    def share(fps: float | None, limit: str) -> str:
        return f"{fps} ({100 * fps / ceiling[limit]:.0f} %)" if fps and limit in ceiling else str(fps or "-")

    print("| UNet + VAE alone | frames/s (of limit) | sustained | sustained SM MHz | UNet / VAE ms/frame |")
    print("| --- | --- | --- | --- | --- |")
    for name, g in rows.items():
        mhz = g.get("sustained_gpu", {}).get("sm_mhz_median", "-")
        burst, hot = share(g["fps"], "limit_fps"), share(g.get("sustained_fps"), "limit_fps_sustained")
        print(f"| {name} | {burst} | {hot} | {mhz} | {g['unet_ms_per_frame']} / {g['vae_ms_per_frame']} |")


def print_table(r: dict) -> None:
    """The headline numbers: ours vs baseline per template, the limits and cold starts."""
    env = r.get("env", {})
    print(
        f"\n{env.get('device')}, torch {env.get('torch')}, {env.get('cpus')} CPUs, batch {env.get('batch')}"
    )
    ceiling = r.get("ceiling", {})
    if "limit_fps" in ceiling:
        print(f"fp16 matmul {ceiling['fp16_matmul_tflops']} TFLOP/s -> limit {ceiling['limit_fps']} frames/s")
    if "limit_fps_sustained" in ceiling:
        mhz = ceiling["sustained_gpu"]["sm_mhz_median"]
        print(
            f"sustained (after {HOT_SECONDS:.0f} s of matmuls, SM {mhz} MHz): fp16 matmul "
            f"{ceiling['fp16_matmul_tflops_sustained']} TFLOP/s -> limit {ceiling['limit_fps_sustained']}"
        )
    print_generators(r, ceiling)
    cols = ["template", "path", "frames/s", "rtf", "unet s", "vae s", "composite s", "encode s", "build s"]
    cols += ["peak GB", "x base"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for key, s in sorted(r.get("ours", {}).items()):
        name, mode = key.split("/")
        row = s.get("warm")
        if not row:
            continue
        base = r.get(f"baseline_{name}", {}).get("fps_end_to_end")
        ratio = f"{row['fps'] / base:.1f}" if base else "-"
        build = s.get("cold", {}).get("extra", {}).get("build", 0.0)
        cells = [name, mode, f"{row['fps']:.1f}", f"{row['rtf']:.1f}"]
        cells += [f"{row[k]:.2f}" for k in ("unet", "vae_decode", "composite", "encode")]
        cells += [f"{build:.2f}", str(row["peak_gpu_gb"]), ratio]
        print("| " + " | ".join(cells) + " |")
    for name in ("512", "1080p"):
        b = r.get(f"baseline_{name}", {})
        if "fps_end_to_end" in b:
            print(
                f"| {name} | baseline | {b['fps_end_to_end']} (loop+PNG {b['fps_with_png']}, "
                f"no PNG {b['fps_skip_save']}) | | | | | | | | 1.0 |"
            )
    for path, c in r.get("cold_start", {}).items():
        if isinstance(c, dict) and "first_frame_s" in c:
            runs = ", ".join(map(str, c.get("runs_first_frame_s", [])))
            print(f"cold start {path}: first frame {c['first_frame_s']} s after process start (runs: {runs})")
    if r.get("errors"):
        print("errors:", json.dumps(r["errors"], indent=1))


if __name__ == "__main__":
    main()

"""Render benchmark: our chunk path against an official-style baseline, side by side in one run.

Full-size random-weight models in the official layout (``bench.assets``), a 512² template (one image)
and a 1920×1080 template (16-frame clip), prepared with manual face boxes, and 40 s of speech-like
audio. Then these sections, each timed and saved as it finishes (a failing section is recorded and the
rest still run), in this order; the last ones are skipped first when ``--budget`` runs out:

* ``ceiling``: the measured fp16 matmul rate as a limit in frames/s (800 GFLOP/frame), on a cold GPU (a
  burst) and sustained (after ``HOT_SECONDS`` of matmuls: a power-capped GPU lowers its clock);
* ``ours_<template>_<mode>`` (templates ``512``, ``1080p``; modes ``graphs``, ``eager``):
  ``render_chunk`` (features in → encoded H.264 segment out), cold (the mode's first chunk in the
  process) and warm: stage seconds, frames/s, real-time factor, peak GPU memory, CPU cores busy;
* ``baseline_<template>``: ``bench.baseline`` (eager fp16, batch 20, per-frame PIL paste-back, PNGs,
  then a separate encode);
* ``equality``: device paste vs ``paste_face`` on the GPU's own faces, their YUV (the block converted
  on the GPU vs the whole frame, and vs swscale); the fast path vs the reference path;
* ``oom``: GPU memory capped below what the batch needs: the out-of-memory fallback, and its frames vs
  an undisturbed render at the batch size it settled on;
* ``kill_retry``: a render step process SIGKILLed mid-chunk, run again in a fresh process: its decoded
  frames vs an undisturbed render;
* ``compiled``: the torch.compile path in its own process (compile cost, warm chunks, UNet + VAE alone),
  then its cold start with the on-disk compile cache warm;
* ``aot``: the AOT engine built as a deployment builds it (``musetalk engine build``, unless
  ``--engines`` has it), warm chunks and UNet + VAE alone through it, its frames vs the reference path's,
  then cold starts of a render step on mode ``aot`` and on the default mode (which finds the engine);
* ``cold_start``: fresh processes, process start → first frame (3 s clip; the median of
  ``--cold-repeats``), as a render step (features from the audio step: no whisper) on the default mode
  and each fast path, and as the CLI (whisper in the process); one ``-X importtime`` profile, ``import
  torch`` alone, and the default render step with a filled bytecode cache (as in our image, whose pip
  compiled torch's bytecode), also at each ``--cold-batches`` size;
* ``encoder_alone``: x264 alone on the templates' frames (segments at once, with and without B-frames,
  two presets, RGB vs YUV input; bytes and PSNR);
* ``generator``: UNet + VAE decode alone per fallback mode and batch size (here and in ``aot`` and
  ``compiled``: a batch at a time, then sustained, with the SM clock and power it ran at);
* ``cpu_reference``: the GPU fp16 fast path vs the CPU fp32 reference path on the same frames.

Run from the repository root (the project importable: installed, or on ``PYTHONPATH``)::

    python -m bench.render --batch 64 --sections ceiling,baseline_512,baseline_1080p,aot,cold_start
    python -m bench.render --quick --frames 4 --batch 4 --sections ours_512_eager   # CPU smoke run, ~1 min

Writes ``bench.json`` into ``--out`` (default ``$OUT``, else ``./bench-out/``; the AOT engine it built
in ``engines/``, for ``--engines`` of a later run) and prints the device and limits, a table of UNet +
VAE alone per path (frames/s, burst and sustained, as a share of the limit), a table per template and
path (frames/s, real-time factor, stage seconds, peak GPU GB, × the baseline) and the cold starts.
Results are recorded in bench/RESULTS.md.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    GFLOP_PER_FRAME,
    HOT_SECONDS,
    ROOT,
    START,
    Bench,
    GpuClock,
    Report,
    child_failure,
    cpu_seconds,
    cuda,
    decoded,
    diff_stats,
    generator_fps,
    matmul_tflops,
    measure_generator,
    module_command,
    packed_yuv,
    parser,
    png_dir_stats,
    psnr_db,
    render_once,
    swscale_yuv,
    work_dir,
)
from musetalk_ops.audio import AudioFeatures, add_positional_encoding
from musetalk_ops.blend import frame_indices, paste_face
from musetalk_ops.device_paste import DevicePaster
from musetalk_ops.engine.spec import engine_specs, find_engine_for, find_step
from musetalk_ops.generator import FaceGenerator, StageClock
from musetalk_ops.render.chunks import render_chunk
from musetalk_ops.render.fast import cached_generator, release_gpu_memory
from musetalk_ops.render.models import compute_features, load_render_models
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import load_template
from musetalk_ops.video import SegmentWriter
from musetalk_ops.yuv import i420, i420_planes, rgb_to_yuv420

# name: (method, seconds of budget it needs to start, CUDA only)
SECTIONS = {
    "ceiling": ("ceiling", 0, False),
    **{
        f"ours_{template}_{mode}": ("ours", 30, mode == "graphs")
        for template in ("512", "1080p")
        for mode in ("graphs", "eager")
    },
    "baseline_512": ("baseline", 50, False),
    "baseline_1080p": ("baseline", 50, False),
    "equality": ("equality", 30, False),
    "oom": ("oom", 30, True),
    "kill_retry": ("kill_retry", 40, True),
    "compiled": ("compiled", 200, True),
    "aot": ("aot", 150, False),
    "cold_start": ("cold_starts", 45, False),
    "encoder_alone": ("encoder_alone", 60, False),
    "generator": ("generator", 20, False),
    "cpu_reference": ("cpu_reference", 15, True),
}


def paste_equality(models, template, batch: int) -> dict:
    """Faces generated on the GPU, pasted on the GPU (device_paste) and on the CPU (paste_face); the
    frame's YUV from the block converted on the GPU vs the whole pasted frame converted on the GPU
    (exact) and by swscale (what the reference path encodes)."""
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


def run_child(kind: str, logs: Path, *args) -> tuple[dict, float]:
    """This module in a fresh interpreter (``--child KIND ...``); its last stdout line is JSON."""
    started = time.time()
    proc = subprocess.run(
        module_command(__spec__.name, "--child", kind, *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(child_failure(kind, proc.stderr, logs))
    return json.loads(proc.stdout.strip().splitlines()[-1]), started


def cold_start(
    mode: str,
    batch: int,
    models_root: Path,
    cache: Path,
    wav: Path,
    out: Path,
    *features: Path,
    logs: Path,
    repeats: int = 1,
    env: dict | None = None,
) -> dict:
    """Fresh interpreters render a short clip (``bench.cold_start``, which imports only what a render
    needs); process start → first frame handed to the encoder. With ``repeats`` > 1 the median run is
    reported (the imports alone vary by a second between runs on the lent machines), with every run's time.
    """
    runs = []
    for _ in range(repeats):
        started = time.time()
        proc = cold_start_process(mode, batch, models_root, cache, wav, out, *features, env=env)
        if proc.returncode != 0:
            raise RuntimeError(child_failure(f"cold-start-{mode}", proc.stderr, logs))
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        marks = {k: round(v - started, 3) for k, v in result.pop("marks").items()}
        runs.append({"first_frame_s": marks["first_frame"], "marks_since_process_start": marks, **result})
    runs.sort(key=lambda run: run["first_frame_s"])
    return {**runs[len(runs) // 2], "runs_first_frame_s": [run["first_frame_s"] for run in runs]}


def import_profile(logs: Path, *args: object) -> None:
    """One render step's ``-X importtime`` report (``args`` as ``cold_start_process`` takes them after the
    mode), kept in ``logs`` beside the report (not timed: it slows imports)."""
    proc = cold_start_process("default", *args, python_flags=("-X", "importtime"))
    (logs / "importtime-render-step.log").write_text(proc.stderr)


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
    """``bench.cold_start`` in a fresh interpreter (see its docstring for the arguments)."""
    return subprocess.run(
        module_command("bench.cold_start", mode, batch, *paths, python_flags=python_flags),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )


def compiled_child(models_root: str, cache_512: str, cache_hd: str, wav: str, work: str, batch: str) -> None:
    """The compiled path in its own process: a compiler failure cannot disturb the other sections, and
    the first chunk pays a cold compile as the first process on a new GPU type would."""
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


def aot_child(models_root: str, cache_512: str, cache_hd: str, wav: str, work: str, batch: str) -> None:
    """Build an AOTInductor engine (``musetalk engine build``) in its own process, then render through it."""

    def say(message: str) -> None:  # progress on stderr: kept beside the report if the child fails
        print(f"[aot child {time.time() - START:.0f} s] {message}", file=sys.stderr, flush=True)

    models = load_render_models(RenderSettings(models_root=Path(models_root)))
    features = compute_features(models, Path(wav))
    frames, batch_size = features.num_frames(25), int(batch)
    t = time.perf_counter()
    specs = engine_specs(models.unet, models.vae, batch_size)
    reused = [name for name, spec in specs.items() if find_step(spec) is not None]
    # As a deployment builds it: the CLI, its missing steps side by side in their own processes
    build = ["engine", "build", "--models", models_root, "--batch-size", str(batch_size)]
    subprocess.run([sys.executable, "-m", "musetalk_ops.cli", *build], check=True)
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
    template = load_template(cache)
    settings = RenderSettings(models_root=Path(models_root))
    models = load_render_models(settings, version=template.version, components=("unet", "vae"))
    started = Path(out + ".started")

    def progress(_n: int) -> None:
        started.touch()

    features = AudioFeatures.load(Path(features_file))
    render_chunk(models, template, features, 0, int(frames), Path(out), settings, on_frames=progress)
    print(json.dumps({"done": True}))


def encode_alone(
    frames: np.ndarray, count: int, writers: int, directory: Path, preset: str, yuv: bool, bframes: int = 0
) -> dict:
    """x264 alone on the template's own frames (ping-pong), ``writers`` segments at once; ``yuv``: frames
    handed over already converted (``write_yuv``, as the fast path does), else RGB converted by
    swscale on the encoder threads (``write``, the reference path). Bytes per frame and the PSNR of
    the first segment's decoded YUV against its input say what a setting costs in quality."""
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


class RenderBench(Bench):
    """The sections (``SECTIONS``), in order of importance: the last are the first skipped."""

    def run(self) -> None:
        self.record_env(frames=self.args.frames, batch=self.batch)
        run = self.report.run
        run("ceiling", self.ceiling)
        self.inputs()
        for name, (method, needs, needs_cuda) in SECTIONS.items():
            if name != "ceiling" and (cuda() or not needs_cuda):
                fn = self.per_template(name) if method in ("ours", "baseline") else getattr(self, method)
                run(name, fn, needs=needs)

    def per_template(self, name: str) -> Callable[[dict], None]:
        """``ours_<template>_<mode>`` and ``baseline_<template>``: one method per kind, per template."""
        kind, template, *mode = name.split("_")
        return lambda s: self.ours(s, template, *mode) if kind == "ours" else self.baseline(s, template)

    def ceiling(self, s: dict) -> None:
        if cuda():
            s["fp16_matmul_tflops"] = round(matmul_tflops(), 1)
            s["limit_fps"] = round(s["fp16_matmul_tflops"] * 1000 / GFLOP_PER_FRAME, 1)
            with GpuClock() as gpu:
                s["fp16_matmul_tflops_sustained"] = round(matmul_tflops(hot=True), 1)
            s["sustained_gpu"] = gpu.summary
            s["limit_fps_sustained"] = round(s["fp16_matmul_tflops_sustained"] * 1000 / GFLOP_PER_FRAME, 1)

    def ours(self, s: dict, name: str, mode: str) -> None:
        cached_generator.cache_clear()  # each path's memory and one-off costs on their own
        s["cold"] = self.render(name, mode=mode)  # first chunk of this path in the process
        s["warm"] = self.render(name, mode=mode)
        self.r.setdefault("ours", {})[f"{name}/{mode}"] = s

    def baseline(self, s: dict, name: str) -> None:
        from bench.baseline import (  # diffusers: 10 s
            OfficialAvatar,
            encode_pngs,
            official_models,
            run_baseline,
        )

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
        step_features = self.work / "short-features.safetensors"
        compute_features(self.models, self.short_wav).save(step_features)
        args = (self.batch, self.models_root, self.prepared["512"], self.short_wav, self.work / "c.mp4")
        runs = {"logs": self.args.out, "repeats": self.args.cold_repeats}
        for mode in ("default", *self.modes):
            s[f"{mode}/render_step"] = cold_start(mode, *args, step_features, **runs)
        s["default/cli"] = cold_start("default", *args, **runs)
        import_profile(self.args.out, *args, step_features)
        s["import_torch"] = import_torch_seconds()
        # As in an image whose installer compiled every module's bytecode (pip does; k8s/Dockerfile):
        # a bytecode cache filled by one untimed run first.
        cached = bytecode_cache_env()
        cold_start_process("default", *args, step_features, env=cached)
        s["default/render_step/bytecode_cached"] = cold_start(
            "default", *args, step_features, **runs, env=cached
        )
        for batch in self.args.cold_batches:  # the same at other batch sizes (their engines found or not)
            s[f"default/render_step/bytecode_cached/b{batch}"] = cold_start(
                "default", batch, *args[1:], step_features, **runs, env=cached
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

    def oom(self, s: dict) -> None:
        """The real CUDA out-of-memory path: cap this process's GPU memory so that the batch does not fit,
        render, and compare with an undisturbed render at the batch size the fallback settled on."""
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
        n, cache = min(200, self.frames), self.prepared["1080p"]
        features = self.work / "kill-features.safetensors"
        compute_features(self.models, self.wav).save(features)
        out = self.work / "killed.mp4"
        victim = subprocess.Popen(
            module_command(__spec__.name, "--child", "chunk", self.models_root, cache, features, n, out),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
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
        run_child("chunk", self.args.out, self.models_root, cache, features, n, out)
        # The undisturbed render as production makes it (a fresh step process), and one in this long-lived
        # process, whose memory state can lead cuDNN to other convolution algorithms.
        fresh, here = self.work / "calm-fresh.mp4", self.work / "calm-here.mp4"
        run_child("chunk", self.args.out, self.models_root, cache, features, n, fresh)
        settings = RenderSettings(batch_size=self.batch)
        render_chunk(self.models, self.templates["1080p"], AudioFeatures.load(features), 0, n, here, settings)
        a, b, c = decoded(out), decoded(fresh), decoded(here)
        s["frames"] = [len(a), len(b), len(c)]
        s["retry_vs_undisturbed_fresh_process_decoded"] = diff_stats(a, b)
        s["retry_vs_undisturbed_bench_process_decoded"] = diff_stats(a, c)

    def compiled(self, s: dict) -> None:
        result, _ = run_child(
            "compiled",
            self.args.out,
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
            logs=self.args.out,
        )

    def aot(self, s: dict) -> None:
        args = (self.prepared["512"], self.prepared["1080p"], self.wav, self.work, self.batch)
        result, _ = run_child("aot", self.args.out, self.models_root, *args)
        s.update(result)
        # Kept with the report: a later run given --engines reuses it instead of building again
        for package in s["engine"].values():
            shutil.copytree(self.work / "cache" / "engines" / package, self.args.out / "engines" / package)
        for name in self.templates:
            self.r.setdefault("ours", {})[f"{name}/aot"] = {
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
                logs=self.args.out,
                repeats=self.args.cold_repeats,
            )

    def cpu_reference(self, s: dict) -> None:
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


def main() -> None:
    p = parser(__spec__.name, __doc__, SECTIONS)
    p.add_argument("--baseline-frames", type=int, default=150, help="frames of the official-style baseline")
    p.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per cold start (median)")
    p.add_argument(
        "--cold-batches",
        type=lambda v: [int(b) for b in v.split(",")],
        default=[],
        help="cold_start: the render step's default path also at these batch sizes (bytecode cached)",
    )
    args = p.parse_args()
    if args.child:
        children = {"compiled": compiled_child, "chunk": chunk_child, "aot": aot_child}
        children[args.child[0]](*args.child[1:])
        return
    work = work_dir("musetalk-bench-", args.engines)
    report = Report(args.out, args.budget, ["-m", __spec__.name, *sys.argv[1:]], args.sections)
    RenderBench(args, work, report).run()
    print_table(report.data)
    report.save()


if __name__ == "__main__":
    main()

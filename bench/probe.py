"""Diagnostics behind the render benchmark's numbers: what bounds a chunk, and what the AOT engine's
batch size buys.

The inputs of ``bench.render`` (models, templates, audio), then these sections, each timed and saved as
it finishes (the last are skipped first when ``--budget`` runs out):

* ``bound``: a warm chunk per template as is, without x264 (frames dropped), without the models (a fixed
  face batch) and without both, with the model thread's host seconds in compositing: which stage
  bounds the chunk;
* ``bframes``: x264 on one thread with and without B-frames (``video.BFRAMES``) on three kinds of frames
  a render makes (a still 512² face whose mouth moves; 1080p with sensor noise, still and panning): CPU
  ms, bytes and PSNR per frame (no GPU needed);
* ``encoders``: a warm 1080p chunk on the AOT engine per number of sub-segment encoders and x264 threads
  per encoder (``--encoder-configs``; ``encoders.X264_THREADS``): what feeds x264 best on this host;
* ``engine_batches``: the AOT engine at each batch size of ``--engine-batches`` (the packages
  ``--engines`` lacks are built first, each in its own process, all at once), UNet + VAE through the
  generator a batch at a time and sustained, the batch sizes measured in turn for two rounds so that the
  GPU's drift falls on each alike, and each engine's kernels by kind;
* ``short_chunks``: chunks of each of ``--chunk-frames`` (default 75: a 3 s reply) at 512², rendered warm
  through the AOT engine at each of ``--engine-batches`` in turn, five rounds after a first: what a larger
  batch costs a short clip. ``64whole`` is the engine of 64 with every batch on its UNet of 64 (no UNet of
  32 for the chunk's short tail);
* ``profile_aot``: the AOT engine's kernels (``--engines`` of an earlier run, else built) per model and
  kind (convolution, GEMM, attention, Inductor's reductions and pointwise kernels), in ms per frame.

Run from the repository root::

    python -m bench.probe --batch 64 --engines DIR --sections engine_batches,short_chunks \
        --engine-batches 32,64,64whole --chunk-frames 75,1000
    python -m bench.probe --quick --sections bframes   # CPU, no GPU needed

Writes ``probe.json`` into ``--out`` (default ``$OUT``, else ``./bench-out/``) and prints each
measurement as a line (a section's key and its JSON) as it finishes, then a table of the measurements
of ``engine_batches`` and ``short_chunks``. Results are recorded in bench/RESULTS.md.
"""

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from bench import assets
from bench.common import (
    Bench,
    Report,
    cpu_seconds,
    cuda,
    decoded,
    measure_generator,
    packed_yuv,
    parser,
    psnr_db,
    render_once,
    work_dir,
)
from musetalk_ops import device_paste
from musetalk_ops.engine import load as engine_load
from musetalk_ops.engine import spec as engine_spec
from musetalk_ops.models.vae import decode_sliced
from musetalk_ops.render import encoders as sub_segments
from musetalk_ops.render import fast
from musetalk_ops.video import SegmentWriter

# name: (seconds of budget it needs to start, CUDA only)
SECTIONS = {
    "bound": (60, False),
    "bframes": (60, False),
    "encoders": (40, True),
    "engine_batches": (60, True),
    "short_chunks": (30, True),
    "profile_aot": (30, True),
}


class Probe(Bench):
    def run(self) -> None:
        self.record_env()
        self.inputs()
        for name, (needs, needs_cuda) in SECTIONS.items():
            if cuda() or not needs_cuda:
                self.report.run(name, getattr(self, name), needs=needs)

    def bound(self, s: dict) -> None:
        """One warm 1000-frame chunk per template with stages taken out, graphs mode."""
        mode = self.modes[0]
        host = {"composite": 0.0, "patches": 0.0, "generator": 0.0}

        def timed(fn, key):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    host[key] += time.perf_counter() - t

            return wrapper

        real_generator, real_writer, real_mux = fast.cached_generator, sub_segments.SegmentWriter, fast.mux
        real_composite, real_patches = device_paste.DevicePaster.composite, fast.host_patches

        class NoWriter:
            def __init__(self, path, *a, **k):
                self.path = Path(path)

            def __enter__(self):
                return self

            def write_yuv(self, frame) -> None:
                pass

            def __exit__(self, *exc) -> None:
                self.path.touch()

        class FixedFaces:
            build_seconds = 0.0

            def __init__(self, n: int, device) -> None:
                self.faces = torch.randint(0, 256, (n, 256, 256, 3), dtype=torch.uint8, device=device)

            def __call__(self, latents, tokens, clock):
                return self.faces[: len(latents)]

        def no_mux(parts, audio, out, comment) -> None:
            Path(out).touch()

        fixed = FixedFaces(self.batch, self.models.device)
        # variant: (x264 encodes, the models run)
        variants = {
            "full": (True, True),
            "no_encode": (False, True),
            "no_model": (True, False),
            "neither": (False, False),
        }
        for name in self.templates:
            self.render(name, mode=mode)  # warm: the generator's graphs are captured
            for variant, (encodes, models_run) in variants.items():
                sub_segments.SegmentWriter, fast.mux = (
                    (real_writer, real_mux) if encodes else (NoWriter, no_mux)
                )
                fast.cached_generator = real_generator if models_run else (lambda *a: fixed)
                device_paste.DevicePaster.composite = timed(real_composite, "composite")
                fast.host_patches = timed(real_patches, "patches")
                for key in host:
                    host[key] = 0.0
                try:
                    row = self.render(name, mode=mode)
                finally:
                    fast.cached_generator, sub_segments.SegmentWriter = real_generator, real_writer
                    fast.mux = real_mux
                    device_paste.DevicePaster.composite, fast.host_patches = real_composite, real_patches
                row["model_thread_host_s"] = {k: round(v, 3) for k, v in host.items()}
                keys = ("fps", "unet", "vae_decode", "composite", "encode", "total", "cpu_cores_busy")
                s[f"{name}/{variant}"] = {k: row[k] for k in keys} | {
                    "model_thread_host_s": row["model_thread_host_s"]
                }
                print(name, variant, json.dumps(s[f"{name}/{variant}"]), flush=True)

    def bframes(self, s: dict) -> None:
        image, rng, count = assets.astronaut(), np.random.default_rng(0), 150

        def noisy(frame: np.ndarray, sigma: float) -> np.ndarray:
            noise = rng.normal(0, sigma, frame.shape).round().astype(np.int16)
            return np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)

        big = cv2.resize(image, (2400, 2400), interpolation=cv2.INTER_CUBIC)

        def still_mouth(i: int) -> np.ndarray:
            frame, a = image.copy(), (np.sin(i / 3) + 1) / 2
            frame[200:280, 200:300] = a * image[200:280, 200:300] + (1 - a) * image[210:290, 195:295]
            return frame

        def pan(i: int) -> np.ndarray:
            dx, dy = int(40 * np.sin(i / 30)), int(20 * np.sin(i / 45))
            return noisy(big[200 + dy : 1280 + dy, 240 + dx : 2160 + dx], 1.0)

        still = [noisy(big[200:1280, 240:2160], 1.5) for _ in range(16)]
        kinds = {
            "512_still_moving_mouth": still_mouth,
            "1080p_still_noise": lambda i: still[i % 16],
            "1080p_panning_noise": pan,
        }
        for kind, make in kinds.items():
            frames = [make(i) for i in range(count)]
            yuv = [packed_yuv(f) for f in frames]
            height, width = frames[0].shape[:2]
            for bframes in (0, 3):
                path = self.work / f"bframes{bframes}.mp4"
                cpu = cpu_seconds()
                with SegmentWriter(path, 25, width, height, threads=1, bframes=bframes) as writer:
                    for planes in yuv:
                        writer.write_yuv(planes)
                cpu = cpu_seconds() - cpu
                s[f"{kind}/b{bframes}"] = {
                    "cpu_ms_per_frame": round(1000 * cpu / count, 2),
                    "kbytes_per_frame": round(path.stat().st_size / count / 1024, 2),
                    "psnr_yuv_db": psnr_db(decoded(path, "yuv420p"), yuv),
                }
                print(kind, bframes, s[f"{kind}/b{bframes}"], flush=True)

    def encoders(self, s: dict) -> None:
        self.render("1080p", mode="aot")  # warm: engine loaded, graphs captured
        keys = ("fps", "composite", "encode", "total", "cpu_cores_busy", "extra")
        for encoders, threads in self.args.encoder_configs or (
            (4, 0),
            (4, 4),
            (6, 0),
            (8, 0),
            (8, 2),
            (4, 0),
        ):
            sub_segments.X264_THREADS = threads
            try:
                row = self.render("1080p", mode="aot", encoders=encoders)
            finally:
                sub_segments.X264_THREADS = 0
            key = f"1080p/encoders{encoders}/threads{threads}"
            s.setdefault(key, []).append({k: row[k] for k in keys})
            print(key, json.dumps(s[key][-1]), flush=True)

    def profile_aot(self, s: dict) -> None:
        s.update(engine_kernels(self.models.unet, self.models.vae, self.batch))
        for name in ("unet", "vae"):
            print(name, json.dumps(s[name]["by_kind"]), s[name]["ms_per_frame"], flush=True)

    def engine_batches(self, s: dict) -> None:
        unet, vae = self.models.unet, self.models.vae
        batches = sorted({b for _, b, _ in self.engine_batches_arg()})
        missing = {}
        for b in batches:
            for part, spec in engine_spec.engine_specs(unet, vae, b).items():
                if engine_spec.find_step(spec) is None:
                    missing[spec.key] = (part, b)
        s["builds"] = self.build_children(list(missing.values()))
        for _ in range(2):
            for b in batches:
                gen = fast.cached_generator(unet, vae, "aot", b)
                s[f"b{b}/engine"] = gen.engine
                s.setdefault(f"b{b}", []).append(measure_generator(gen, self.models, b))
                print(f"b{b}", json.dumps(s[f"b{b}"][-1]), flush=True)
                self.report.save()
        for b in batches:
            s[f"b{b}/kernels"] = engine_kernels(unet, vae, b)
            self.report.save()

    def engine_batches_arg(self) -> list[tuple[str, int, bool]]:
        """``--engine-batches`` as (label, batch, whole): ``64`` runs the engine as built (a tail that one
        decode slice holds on the UNet of that slice), ``64whole`` every batch on the UNet of 64."""
        labels = self.args.engine_batches or [str(self.batch)]
        return [(label, int(label.removesuffix("whole")), label.endswith("whole")) for label in labels]

    def short_chunks(self, s: dict) -> None:
        keys, t = ("total", "unet", "vae_decode", "fps", "peak_gpu_gb"), self.templates["512"]
        for frames in self.args.chunk_frames:
            for round_ in range(6):  # the first is each configuration's first chunk; not in the median
                for label, b, whole in self.engine_batches_arg():
                    gen = fast.cached_generator(self.models.unet, self.models.vae, "aot", b)
                    gen.buckets = (b,) if whole else engine_spec.unet_batches(b)
                    row = render_once(
                        self.models, t, self.features, frames, self.work / "o.mp4", batch_size=b, mode="aot"
                    )
                    key = f"{frames}/b{label}"
                    s.setdefault(key if round_ else f"{key}/first", []).append({k: row[k] for k in keys})
                    print(key, round_, json.dumps(row), flush=True)
            for label, _, _ in self.engine_batches_arg():
                key = f"{frames}/b{label}"
                s[f"{key}/median_total_s"] = statistics.median(r["total"] for r in s[key])
            self.report.save()

    def build_children(self, parts: list[tuple[str, int]]) -> dict:
        """``(part, render batch)`` packages built at once, each in its own process (``musetalk engine
        build --part``): the seconds each took and the wall time, or a child's error."""
        t = time.perf_counter()
        cli = [sys.executable, "-m", "musetalk_ops.cli", "engine", "build", "--models", str(self.models_root)]
        procs = {
            f"{part}@b{batch}": subprocess.Popen(
                [*cli, "--part", part, "--batch-size", str(batch)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for part, batch in parts
        }
        built = {}
        for name, proc in procs.items():
            out, err = proc.communicate()
            ok = proc.returncode == 0
            built[name] = {"out": out.strip()} if ok else {"error": err[-600:]}  # out: its seconds, package
            print(name, json.dumps(built[name]), flush=True)
        built["wall_s"] = round(time.perf_counter() - t, 1)
        return built


def engine_kernels(unet, vae, batch: int) -> dict:
    """Kernel times of the AOT engine's UNet and VAE decode at ``batch`` (found, else built), called
    directly (no graph, so each kernel is seen): ``kernel_profile`` per step."""
    engine = engine_load.engine_for(unet, vae, batch)
    latents = torch.randn(batch, 8, 32, 32, device="cuda", dtype=torch.float16)
    tokens = torch.randn(batch, 50, 384, device="cuda", dtype=torch.float16)
    pred = engine.unet(latents, tokens)
    return {
        "engine": engine.name,
        "unet": kernel_profile(lambda: engine.unet(latents, tokens), batch),
        "vae": kernel_profile(lambda: decode_sliced(engine.vae, pred), batch),
    }


def kernel_profile(step: Callable[[], object], batch: int, iters: int = 3) -> dict:
    """CUDA kernel times of ``step()`` (warm, not in a graph, so each kernel is seen): ms per frame in
    all and by kind, and the largest kernels."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        ms = event.device_time_total / 1000 / iters / batch  # µs over all calls → ms per frame
        if ms <= 0:
            continue
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + ms
        kernels.append((ms, event.count // iters, event.key[:90]))
    kernels.sort(reverse=True)
    return {
        "ms_per_frame": round(sum(kinds.values()), 4),
        "by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "kernels_per_call": sum(n for _, n, _ in kernels),
        "largest": [[round(ms, 4), n, key] for ms, n, key in kernels[:25]],
    }


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind from its name (cuDNN/CUTLASS convolutions, cuBLAS GEMMs, attention, Inductor)."""
    lower = name.lower()
    if "triton" in lower:
        return "inductor_reduction" if "red" in lower or "per_fused" in lower else "inductor_pointwise"
    if "flash" in lower or "fmha" in lower or "attention" in lower:
        return "attention"
    if "conv" in lower or "implicit" in lower or "xmma_fprop" in lower or "nhwc" in lower or "fprop" in lower:
        return "convolution"
    if "gemm" in lower or "nvjet" in lower or "cutlass" in lower or "sm90" in lower:
        return "gemm"
    if "memcpy" in lower or "memset" in lower:
        return "copy"
    return "other"


def print_table(r: dict) -> None:
    """UNet + VAE per engine batch size and round (``engine_batches``), and the short chunks' medians."""
    batches = r.get("engine_batches", {})
    rows = [
        (key, n, g) for key, runs in batches.items() if isinstance(runs, list) for n, g in enumerate(runs)
    ]
    if rows:
        print("| engine | round | frames/s | sustained | sustained SM MHz | UNet / VAE ms/frame |")
        print("| --- | --- | --- | --- | --- | --- |")
        for key, n, g in rows:
            mhz = g.get("sustained_gpu", {}).get("sm_mhz_median", "-")
            speed = f"{g['unet_ms_per_frame']} / {g['vae_ms_per_frame']}"
            print(f"| {key} | {n + 1} | {g['fps']} | {g.get('sustained_fps', '-')} | {mhz} | {speed} |")
    medians = {k: v for k, v in r.get("short_chunks", {}).items() if k.endswith("/median_total_s")}
    if medians:
        print("| chunk frames / engine | median total s |")
        print("| --- | --- |")
        for key, seconds in medians.items():
            print(f"| {key.removesuffix('/median_total_s')} | {seconds:.4f} |")
    if r.get("errors"):
        print("errors:", json.dumps(r["errors"], indent=1))


def main() -> None:
    p = parser(__spec__.name, __doc__, SECTIONS)
    p.add_argument(
        "--engine-batches",
        type=lambda v: v.split(","),
        help="engine_batches, short_chunks: e.g. 32,64,64whole",
    )
    p.add_argument(
        "--chunk-frames",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[75],
        help="short_chunks: chunk lengths, e.g. 75,1000",
    )
    p.add_argument(
        "--encoder-configs",
        type=lambda v: [tuple(map(int, c.split("x"))) for c in v.split(",")],
        help="encoders: ENCODERSxTHREADS,... (default 4x0,4x4,6x0,8x0,8x2,4x0; 0: x264's choice)",
    )
    args = p.parse_args()
    work = work_dir("musetalk-probe-", args.engines)
    report = Report(args.out, args.budget, ["-m", __spec__.name, *sys.argv[1:]], args.sections, "probe.json")
    Probe(args, work, report).run()
    print_table(report.data)
    report.save()


if __name__ == "__main__":
    main()

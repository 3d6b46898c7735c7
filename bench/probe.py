"""Diagnostics behind bench_render.py's numbers: where a chunk's time goes and which means pay.

Same inputs as bench_render.py (its setup, prepare and engine sections), then, each timed and saved
as it finishes:

* ``imports``: ``import torch`` / cv2 / av alone in fresh interpreters, ``-X importtime``'s largest
  modules, and the one-off CUDA costs of a fresh process (context, cuBLAS, cuDNN, first attention);
* ``bound``: a warm chunk per template as is, without x264 (frames dropped), without the models (a
  fixed face batch) and without both, plus the model thread's host seconds in compositing: which
  stage bounds the chunk;
* ``x264``: the encoder alone on the 1080p template's frames: parallel segments × x264 threads, as
  threads of this process (as the renderer runs them) or as forked processes (no shared GIL), with
  their bits and PSNR against the input;
* ``bframes``: x264 on one thread with and without B-frames (``video.BFRAMES``) on three kinds of frames a
  render makes (a still 512² face whose mouth moves; 1080p with sensor noise, still and panning): CPU
  ms, bytes and PSNR per frame;
* ``vae_variants``: VAE decode alone in CUDA graphs: channels-last, cuDNN autotuning, and the ×2
  upsample folded into four 2×2 phase convolutions (the same function, 16/36 of those convs' work);
* ``compile_variants``: UNet + VAE compiled per variant (Inductor freezing, cuDNN autotuning, batch
  size, norm formulation, decoder micro-batches; ``COMPILE_VARIANTS``), each in its own process;
* ``overlap``: the engine's UNet of one batch beside the VAE decode of the previous one on two streams vs
  one stream, a batch at a time and sustained, with the SM clock and power (``bench_render.GpuClock``);
* ``encoders``: a warm 1080p chunk on the AOT engine per number of sub-segment encoders and x264
  threads per encoder (``render.encoders.X264_THREADS``): what feeds x264 best on this host;
* ``aot_parts``: one engine step (UNet or VAE decode) compiled on its own, plain or tuned
  (``AOT_PARTS``; ``musetalk engine build --autotune``'s settings), each in its own process, timed in
  CUDA graphs beside the same step of the ``--engines`` engine: a tuned engine's parts can be measured
  one device call at a time. Packages are kept in ``$OUT/parts`` and reused from ``--parts``;
* ``engine_batches``: the AOT engine at each batch size of ``--engine-batches`` (the packages
  ``--engines`` lacks are built first, each in its own process, all at once: a UNet per batch size, one
  VAE decode for the batches that share its slice), UNet + VAE through the generator a batch at a time
  and sustained, the batch sizes measured in turn for two rounds so that the GPU's drift falls on each
  alike; each engine's kernels by kind: what a larger batch buys;
* ``short_chunks``: chunks of each of ``--chunk-frames`` (default 75: a 3 s conversational reply) at
  512², rendered warm through the AOT engine at each of ``--engine-batches`` in turn, five rounds after
  a first: what a larger batch costs a short clip against what it gains a long one. ``64whole`` is
  the engine of 64 with every batch on its UNet of 64 (no tail bucket), as before session 11;
* ``profile_aot``: the AOT engine's kernels (``--engines`` of an earlier run, else built), per model and
  kind (convolution, GEMM, attention, Inductor's reductions and pointwise kernels), in ms per frame:
  what a faster engine would have to win.

    python bench/probe.py [--sections imports,bound,...] [--budget 540] [--variants a,b] [--engines DIR]
                          [--parts DIR]

Writes ``$OUT/probe.json`` (or ``./bench-out/``).
"""

import argparse
import functools
import json
import multiprocessing
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import bench_render as br
import numpy as np
import torch


class Variant(NamedTuple):
    """How ``compile_variants`` compiles the models (as load_models returns them: upsamplers folded)."""

    batch: int
    freezing: bool
    cudnn_benchmark: bool
    mode: str  # torch.compile's
    models: tuple[str, ...]
    inductor: dict | None = None  # other Inductor settings
    torch_norm: bool = False  # group norms as torch computes them (before session 7), not layers.GroupNorm
    micro: tuple[int, int] | None = None  # VAE decoder: (first up block, frames) run per micro-batch
    fused: bool = False  # attention projections fused: self-attention q/k/v and cross-attention k/v


# Probes 2–3 ran the freezing ones as generator_bNN, when the generator still froze. Inductor's own
# kernels (group norms, pointwise) hold 43 % of the engine's VAE time (profile_aot, session 6).
COMPILE_VARIANTS = {
    "plain": Variant(20, False, False, "default", ("unet", "vae")),
    "generator": Variant(32, False, True, "default", ("unet", "vae")),  # FaceGenerator's compiled mode
    "freeze_b20": Variant(20, True, True, "default", ("unet", "vae")),
    "freeze_b32": Variant(32, True, True, "default", ("unet", "vae")),
    "freeze_b48": Variant(48, True, True, "default", ("unet", "vae")),
    "vae_max_autotune": Variant(32, False, True, "max-autotune-no-cudagraphs", ("vae",)),
    "unet_max_autotune": Variant(32, False, True, "max-autotune-no-cudagraphs", ("unet",)),
    "vae_default": Variant(32, False, True, "default", ("vae",)),
    "unet_default": Variant(32, False, True, "default", ("unet",)),
    "vae_coordinate_descent": Variant(
        32, False, True, "default", ("vae",), {"coordinate_descent_tuning": True}
    ),
    "unet_coordinate_descent": Variant(
        32, False, True, "default", ("unet",), {"coordinate_descent_tuning": True}
    ),
    "vae_layout_off": Variant(32, False, True, "default", ("vae",), {"layout_optimization": False}),
    "vae_torch_norm": Variant(32, False, True, "default", ("vae",), torch_norm=True),
    "unet_torch_norm": Variant(32, False, True, "default", ("unet",), torch_norm=True),
    # The decoder's high-resolution blocks per micro-batch: a frame's 256² activations (16-32 MB) stay in
    # L2 (50 MB) between a convolution and the group norm that reads its output
    "vae_micro1": Variant(32, False, True, "default", ("vae",), micro=(2, 1)),
    "vae_micro1_last": Variant(32, False, True, "default", ("vae",), micro=(3, 1)),
    "vae_micro2": Variant(32, False, True, "default", ("vae",), micro=(2, 2)),
    "vae_micro8": Variant(32, False, True, "default", ("vae",), micro=(2, 8)),
    # The UNet is the less efficient step (~46 % of the matmul rate vs the VAE's ~60 %): its 4² and 8²
    # levels give a b32 GEMM 512–2048 rows, fewer output tiles than the GPU has SMs, and its 739 kernels
    # per call each pay a fixed cost. A larger batch or fewer, wider GEMMs would amortise both.
    "unet_b48": Variant(48, False, True, "default", ("unet",)),
    "unet_b64": Variant(64, False, True, "default", ("unet",)),
    "unet_fused": Variant(32, False, True, "default", ("unet",), fused=True),
    "unet_fused_b64": Variant(64, False, True, "default", ("unet",), fused=True),
    "unet_1x1_mm": Variant(32, False, True, "default", ("unet",), {"conv_1x1_as_mm": True}),
}


def fresh(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )


def seconds_of(code: str) -> float:
    """Wall seconds of ``code`` (the last stdout line it prints) in a fresh interpreter."""
    return float(fresh(code).stdout.strip().splitlines()[-1])


CUDA_STEPS = """
import time, json
t0 = time.time()
import torch, torch.nn.functional as F
m = {"import_torch": time.time() - t0}
def mark(name):
    torch.cuda.synchronize(); m[name] = time.time() - t0
torch.zeros(1, device="cuda"); mark("cuda_context")
a = torch.randn(512, 512, device="cuda", dtype=torch.float16); (a @ a); mark("first_matmul")
x = torch.randn(4, 64, 64, 64, device="cuda", dtype=torch.float16)
F.conv2d(x, torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.float16), padding=1); mark("first_conv")
F.conv2d(x, torch.randn(128, 64, 3, 3, device="cuda", dtype=torch.float16), padding=1); mark("conv_shape_2")
q = torch.randn(4, 8, 256, 40, device="cuda", dtype=torch.float16)
F.scaled_dot_product_attention(q, q, q); mark("first_sdpa")
print(json.dumps(m))
"""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only
    return usage.ru_utime + usage.ru_stime


def graph_ms(fn, make_input, iters: int = 10, hot: bool = False) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph: a batch at a time, or (``hot``) after replaying it
    back to back for ``bench_render.HOT_SECONDS``."""
    x = make_input()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    if hot:
        br.heat(g.replay)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del g
    return statistics.median(times)


class Probe(br.Bench):
    def run(self) -> None:
        sys.path.insert(0, str(Path(__file__).parent))
        self.r["env"] = {
            "device": torch.cuda.get_device_name() if br.cuda() else "cpu",
            "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)),
        }
        print(json.dumps(self.r["env"]), flush=True)
        run = self.report.run
        run("imports", self.imports)
        run("setup", self.setup)
        run("prepare", self.prepare)
        run("engine", self.engine)
        run("bound", self.bound, needs=60)
        run("x264", self.x264, needs=60)
        run("bframes", self.bframes, needs=60)
        run("aot_parts", self.aot_parts, needs=100)
        if br.cuda():
            run("overlap", self.overlap, needs=30)
            run("encoders", self.encoders, needs=40)
            run("engine_batches", self.engine_batches, needs=60)
            run("short_chunks", self.short_chunks, needs=30)
            run("profile_aot", self.profile_aot, needs=30)
            run("vae_variants", self.vae_variants, needs=30)
            run("compile_variants", self.compile_variants, needs=150)

    def imports(self, s: dict) -> None:
        timer = "import time; t = time.time(); import {}; print(time.time() - t)"
        for name in ("torch", "cv2", "av", "numpy"):
            s[name] = [round(seconds_of(timer.format(name)), 2) for _ in range(2)]
        lines = fresh("import torch, cv2, av", "-X", "importtime").stderr.splitlines()
        rows = []
        for line in lines:
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if m and len(m.group(3)) <= 5:  # top-level and first-level imports
                rows.append((int(m.group(2)), m.group(4)))
        s["largest_cumulative_ms"] = {n: round(us / 1000, 1) for us, n in sorted(rows, reverse=True)[:15]}
        if br.cuda():
            s["cuda_steps_s"] = json.loads(fresh(CUDA_STEPS).stdout.strip().splitlines()[-1])

    def bound(self, s: dict) -> None:
        """One warm 1000-frame chunk per template with stages taken out, graphs mode."""
        from musetalk_ops import device_paste
        from musetalk_ops.render import encoders, fast

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

        real_generator, real_writer, real_mux = fast.cached_generator, encoders.SegmentWriter, fast.mux
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
                encoders.SegmentWriter, fast.mux = (real_writer, real_mux) if encodes else (NoWriter, no_mux)
                fast.cached_generator = real_generator if models_run else (lambda *a: fixed)
                device_paste.DevicePaster.composite = timed(real_composite, "composite")
                fast.host_patches = timed(real_patches, "patches")
                for key in host:
                    host[key] = 0.0
                try:
                    row = self.render(name, mode=mode)
                finally:
                    fast.cached_generator, encoders.SegmentWriter = real_generator, real_writer
                    fast.mux = real_mux
                    device_paste.DevicePaster.composite, fast.host_patches = real_composite, real_patches
                row["model_thread_host_s"] = {k: round(v, 3) for k, v in host.items()}
                keys = ("fps", "unet", "vae_decode", "composite", "encode", "total", "cpu_cores_busy")
                s[f"{name}/{variant}"] = {k: row[k] for k in keys} | {
                    "model_thread_host_s": row["model_thread_host_s"]
                }
                print(name, variant, json.dumps(s[f"{name}/{variant}"]), flush=True)

    def x264(self, s: dict) -> None:
        from musetalk_ops.blend import frame_indices
        from musetalk_ops.video import SegmentWriter

        frames = self.templates["1080p"].frames
        height, width = frames.shape[1:3]
        yuv = [br.packed_yuv(f) for f in frames]
        count = 480

        def encode(writers: int, threads: int, preset: str, processes: bool = False) -> dict:
            per = count // writers
            order = frame_indices(0, per, len(frames), "pingpong")
            paths = [self.work / f"x{n}.mp4" for n in range(writers)]

            def one(n: int) -> None:
                with SegmentWriter(paths[n], 25, width, height, preset=preset, threads=threads) as w:
                    for k in order:
                        w.write_yuv(yuv[k])

            # threads of this process (as the renderer runs them), or forked processes: no shared GIL
            kind = multiprocessing.get_context("fork").Process if processes else threading.Thread
            t, cpu = time.perf_counter(), br.cpu_seconds() + children_cpu_seconds()
            workers = [kind(target=one, args=(n,)) for n in range(writers)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            seconds = time.perf_counter() - t
            out = {
                "fps": round(per * writers / seconds, 1),
                "cores_busy": round((br.cpu_seconds() + children_cpu_seconds() - cpu) / seconds, 1),
                "kbytes_per_frame": round(paths[0].stat().st_size / per / 1024, 1),
            }
            out["psnr_rgb_db"] = br.psnr_db(br.decoded(paths[0]), (frames[k] for k in order))
            return out

        for repeat in range(2):
            for writers, threads, processes in ((4, 0, False), (4, 0, True), (8, 2, True), (16, 1, True)):
                key = f"veryfast/x{writers}/t{threads}/{'processes' if processes else 'threads'}/{repeat}"
                s[key] = encode(writers, threads, "veryfast", processes)
                print(key, s[key], flush=True)

    def bframes(self, s: dict) -> None:
        import assets
        import cv2

        from musetalk_ops.video import SegmentWriter

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
            yuv = [br.packed_yuv(f) for f in frames]
            height, width = frames[0].shape[:2]
            for bframes in (0, 3):
                path = self.work / f"bframes{bframes}.mp4"
                cpu = br.cpu_seconds()
                with SegmentWriter(path, 25, width, height, threads=1, bframes=bframes) as writer:
                    for planes in yuv:
                        writer.write_yuv(planes)
                cpu = br.cpu_seconds() - cpu
                s[f"{kind}/b{bframes}"] = {
                    "cpu_ms_per_frame": round(1000 * cpu / count, 2),
                    "kbytes_per_frame": round(path.stat().st_size / count / 1024, 2),
                    "psnr_yuv_db": br.psnr_db(br.decoded(path, "yuv420p"), yuv),
                }
                print(kind, bframes, s[f"{kind}/b{bframes}"], flush=True)

    def vae_variants(self, s: dict) -> None:
        """VAE decode alone (CUDA graphs), fp16: layouts, autotune, folded upsample; b20 and b48."""
        import copy

        from musetalk_ops.models.layers import fold_upsampling
        from musetalk_ops.models.vae import decode_latents, load_vae

        base = load_vae(self.models_root, "cuda", torch.float16)  # as stored: upsamplers not folded
        folded = fold_upsampling(copy.deepcopy(base))
        z = torch.randn(4, 4, 32, 32, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            a, b = decode_latents(base, z), decode_latents(folded, z)
        s["folded_vs_plain_uint8"] = br.diff_stats(a.cpu().numpy(), b.cpu().numpy())
        for name, vae in (("plain", base), ("folded", folded)):
            for layout in ("nchw", "channels_last"):
                model = vae if layout == "nchw" else copy.deepcopy(vae).to(memory_format=torch.channels_last)
                for bench in (False, True):
                    for batch in (20, 48):
                        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

                        def make(batch=batch, fmt=fmt):
                            return torch.randn(batch, 4, 32, 32, device="cuda", dtype=torch.float16).to(
                                memory_format=fmt
                            )

                        flags = torch.backends.cudnn.flags(enabled=True, benchmark=bench)
                        with torch.inference_mode(), flags:
                            ms = graph_ms(lambda x, m=model: decode_latents(m, x), make)
                        key = f"{name}/{layout}/{'autotune' if bench else 'heuristic'}/b{batch}"
                        s[key] = round(ms / batch, 3)
                        print(key, s[key], "ms/frame", flush=True)
                if model is not vae:
                    del model
        for bench in (False, True):
            for batch in (20, 48):
                unet = self.models.unet
                t = torch.zeros((1,), dtype=torch.int64, device="cuda")
                tokens = torch.randn(batch, 50, 384, device="cuda", dtype=torch.float16)

                def make(batch=batch):
                    return torch.randn(batch, 8, 32, 32, device="cuda", dtype=torch.float16)

                with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=bench):
                    ms = graph_ms(lambda x, u=unet, t=t, c=tokens: u(x, t, c), make)
                s[f"unet/{'autotune' if bench else 'heuristic'}/b{batch}"] = round(ms / batch, 3)

    def encoders(self, s: dict) -> None:
        from musetalk_ops.render import encoders as sub_segments

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

    def overlap(self, s: dict) -> None:
        """The engine's UNet of one batch beside the VAE decode of the previous one, on two streams, vs
        one after the other on one stream (as the generator runs them): CUDA graphs, two buffer sets,
        frames/s over 24 batches. Whether the decode's memory-bound norms fill the UNet's gaps."""
        from musetalk_ops.engine.load import engine_for

        batch, count = self.batch, 24
        engine = engine_for(self.models.unet, self.models.vae, batch)
        sets = []
        for _ in range(2):
            latents = torch.randn(batch, 8, 32, 32, device="cuda", dtype=torch.float16)
            tokens = torch.randn(batch, 50, 384, device="cuda", dtype=torch.float16)
            for _ in range(2):  # warm: cuDNN plans, lazy loading
                engine.vae(engine.unet(latents, tokens))
            torch.cuda.synchronize()
            graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]  # each its own memory pool
            with torch.cuda.graph(graphs[0]):
                pred = engine.unet(latents, tokens)
            with torch.cuda.graph(graphs[1]):
                faces = engine.vae(pred)
            sets.append((*graphs, pred, faces))  # the buffers stay referenced
        torch.cuda.synchronize()

        def timed(launch: Callable[[int], None], batches: int) -> float:
            """Frames/s of ``launch(batches)``, which leaves its work ordered before the current stream's."""
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            launch(batches)
            end.record()
            end.synchronize()
            return round(batches * batch * 1000 / start.elapsed_time(end), 1)

        def one_stream(batches: int) -> None:
            for i in range(batches):
                sets[i % 2][0].replay()
                sets[i % 2][1].replay()

        def two_streams(batches: int, unet_stream: torch.cuda.Stream, vae_stream: torch.cuda.Stream) -> None:
            main = torch.cuda.current_stream()
            unet_stream.wait_stream(main)
            vae_stream.wait_stream(main)
            unet_done = [torch.cuda.Event(), torch.cuda.Event()]
            vae_done = [torch.cuda.Event(), torch.cuda.Event()]
            for i in range(batches):
                k = i % 2
                with torch.cuda.stream(unet_stream):
                    if i >= 2:
                        unet_stream.wait_event(vae_done[k])  # its buffer's decode is done
                    sets[k][0].replay()
                    unet_done[k].record()
                with torch.cuda.stream(vae_stream):
                    vae_stream.wait_event(unet_done[k])
                    sets[k][1].replay()
                    vae_done[k].record()
            main.wait_stream(vae_stream)  # the last decode follows the last UNet

        def one_batch() -> float:  # as bench_render measures the generator: a batch at a time, synced
            times = br.synced_seconds(lambda _: (sets[0][0].replay(), sets[0][1].replay()), 8)
            return round(batch / statistics.median(times), 1)

        with br.GpuClock() as gpu:  # does sustained work slow the clock?
            for priorities in ((0, 0), (-1, 0), (0, -1)):  # lower is higher priority
                streams = [torch.cuda.Stream(priority=p) for p in priorities]
                for _ in range(3):
                    s.setdefault("one_batch_fps", []).append(one_batch())
                    s.setdefault("one_stream_fps", []).append(timed(one_stream, count))
                    s.setdefault(f"two_streams_fps/unet{priorities[0]}_vae{priorities[1]}", []).append(
                        timed(lambda n, streams=streams: two_streams(n, *streams), count)
                    )
            s["one_stream_240_batches_fps"] = timed(one_stream, 240)  # ten seconds
        s["gpu"] = gpu.summary
        print(json.dumps(s), flush=True)

    def profile_aot(self, s: dict) -> None:
        s.update(engine_kernels(self.models.unet, self.models.vae, self.batch))
        for name in ("unet", "vae"):
            print(name, json.dumps(s[name]["by_kind"]), s[name]["ms_per_frame"], flush=True)

    def engine_batches(self, s: dict) -> None:
        from musetalk_ops.engine.spec import engine_specs, find_step
        from musetalk_ops.render.fast import cached_generator

        unet, vae = self.models.unet, self.models.vae
        batches = sorted({b for _, b, _ in self.engine_batches_arg()})
        missing = {}
        for b in batches:
            for part, spec in engine_specs(unet, vae, b).items():
                if find_step(spec) is None:
                    missing[spec.key] = (part, b)
        s["builds"] = self.build_children(list(missing.values()))
        for _ in range(2):
            for b in batches:
                gen = cached_generator(unet, vae, "aot", b)
                s[f"b{b}/engine"] = gen.engine
                s.setdefault(f"b{b}", []).append(br.measure_generator(gen, self.models, b))
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
        from musetalk_ops.engine.spec import unet_batches
        from musetalk_ops.render.fast import cached_generator

        keys, t = ("total", "unet", "vae_decode", "fps", "peak_gpu_gb"), self.templates["512"]
        for frames in self.args.chunk_frames:
            for round_ in range(6):  # the first is each configuration's first chunk; not in the median
                for label, b, whole in self.engine_batches_arg():
                    gen = cached_generator(self.models.unet, self.models.vae, "aot", b)
                    gen.buckets = (b,) if whole else unet_batches(b)
                    row = br.render_once(
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

    def aot_parts(self, s: dict) -> None:
        parts = self.args.out / "parts"
        if self.args.parts:
            shutil.copytree(self.args.parts, parts, dirs_exist_ok=True)
        self.children(s, "part", self.args.variants or ("vae_tuned",), str(parts), str(self.batch))

    def compile_variants(self, s: dict) -> None:
        self.children(s, "compile", self.args.variants or COMPILE_VARIANTS)

    def children(self, s: dict, kind: str, names, *args: str) -> None:
        """Each variant in its own process (``--child KIND NAME MODELS ARGS``), while the budget lasts."""
        for name in names:
            left = self.report.deadline - time.time()
            if left < 100:
                s.setdefault("skipped", []).append(name)
                continue
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", kind, name, str(self.models_root), *args],
                    capture_output=True,
                    text=True,
                    timeout=max(60, left - 20),
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                lines = proc.stdout.strip().splitlines()
                s[name] = json.loads(lines[-1]) if proc.returncode == 0 else {"error": proc.stderr[-600:]}
            except subprocess.TimeoutExpired:
                s[name] = {"error": "timed out"}
            print(name, json.dumps(s[name]), flush=True)
            self.report.save()


def engine_kernels(unet, vae, batch: int) -> dict:
    """Kernel times of the AOT engine's UNet and VAE decode at ``batch`` (found, else built), called
    directly (no graph, so each kernel is seen): ``kernel_profile`` per step."""
    from musetalk_ops.engine.load import engine_for
    from musetalk_ops.models.vae import decode_sliced

    engine = engine_for(unet, vae, batch)
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
    from torch.profiler import ProfilerActivity, profile

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


# name: (engine step, built as ``musetalk engine build --autotune`` if tuned, else as without it)
AOT_PARTS = {
    "vae_tuned": ("vae", True),
    "unet_tuned": ("unet", True),
    "vae_plain": ("vae", False),
    "unet_plain": ("unet", False),
}


def part_child(variant: str, models_root: str, parts_dir: str, batch: str) -> None:
    """Build one engine step as ``variant`` says into ``parts_dir`` (unless an earlier call did), then
    time it and the same step of the engine already there, if any, both in CUDA graphs."""
    from dataclasses import replace

    from musetalk_ops.engine.build import build_step
    from musetalk_ops.engine.runner import bound_step
    from musetalk_ops.engine.spec import engine_specs, find_engine_for, find_step
    from musetalk_ops.engine.steps import engine_steps, step_inputs
    from musetalk_ops.models import load_models

    part, tuned = AOT_PARTS[variant]
    device, dtype = ("cuda", torch.float16) if br.cuda() else ("cpu", torch.float32)
    models = load_models(models_root, device=device, dtype=dtype, components=("unet", "vae"))
    step = engine_steps(models.unet, models.vae)[part]
    specs = engine_specs(models.unet, models.vae, int(batch))
    own = max((spec for spec in specs.values() if spec.step == part), key=lambda spec: spec.batch)
    spec = replace(own, autotune=tuned)  # the UNet at the render batch, or the VAE
    out: dict = {"part": part, "autotune": tuned, "reused": find_step(spec, parts_dir) is not None}
    t = time.perf_counter()
    path = build_step(spec, step, models.device, root=parts_dir)
    out["build_s"] = round(time.perf_counter() - t, 1)
    runners = {variant: bound_step(path, part, step, models.device)}
    engine = find_engine_for(models.unet, models.vae, int(batch))
    if engine is not None:
        runners["engine"] = bound_step(engine[own.part], part, step, models.device)
        out["engine"] = engine[own.part].name
    inputs = step_inputs(spec, models.device, dtype)
    for key, runner in runners.items():

        def run(x, runner=runner):
            return runner.run([x, *inputs[1:]])[0]

        make = lambda: torch.randn_like(inputs[0])  # noqa: E731
        ms = graph_ms(run, make) if br.cuda() else cpu_ms(run, make)
        out[f"{key}_ms_per_frame"] = round(ms / spec.batch, 4)
    print(json.dumps(out))


def cpu_ms(fn, make_input, iters: int = 3) -> float:
    """Median ms of ``fn`` on the CPU, after one warm-up call."""
    x = make_input()
    fn(x)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def micro_batched_decoder(first: int, frames: int) -> None:
    """Make every VAE decoder run its up blocks from ``first`` on, and its output layers, ``frames`` at
    a time (the same function)."""
    from torch.nn import functional as F

    from musetalk_ops.models.vae_model import Decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks[:first]:
            x = block(x)

        def tail(x: torch.Tensor) -> torch.Tensor:
            for block in self.up_blocks[first:]:
                x = block(x)
            return self.conv_out(F.silu(self.conv_norm_out(x)))

        return torch.cat([tail(part) for part in x.split(frames)])

    Decoder.forward = forward


def fuse_attention_projections(model: torch.nn.Module) -> None:
    """Give every self-attention one q/k/v GEMM and every cross-attention one k/v GEMM (the same
    function: the weights concatenated along the output dimension), as diffusers' ``fuse_qkv_projections``."""
    from torch.nn import functional as F

    from musetalk_ops.models.layers import Attention
    from musetalk_ops.models.unet_model import TransformerBlock

    def fused(*linears: torch.nn.Linear) -> torch.Tensor:
        return torch.cat([linear.weight for linear in linears]).detach()

    for block in (m for m in model.modules() if isinstance(m, TransformerBlock)):
        block.attn1.qkv = fused(block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)
        block.attn2.kv = fused(block.attn2.to_k, block.attn2.to_v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        if context is None:
            q, k, v = F.linear(x, self.qkv).chunk(3, dim=-1)
        else:
            q, (k, v) = self.to_q(x), F.linear(context, self.kv).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out[0](out.transpose(1, 2).flatten(2))

    Attention.forward = forward


def compile_child(variant: str, models_root: str) -> None:
    """UNet and/or VAE compiled with ``variant``'s settings in this fresh process: build seconds, warm
    ms/frame of each (CUDA graphs of the compiled code, as the generator runs it) and its kernels."""
    import torch._inductor.config as inductor

    from musetalk_ops.models import layers, load_models
    from musetalk_ops.models.vae import decode_latents

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix=f"inductor-{variant}-"))
    v = COMPILE_VARIANTS[variant]
    inductor.freezing = v.freezing
    for name, value in (v.inductor or {}).items():
        setattr(inductor, name, value)
    if v.torch_norm:
        layers.GroupNorm.forward = torch.nn.GroupNorm.forward
    if v.micro:
        micro_batched_decoder(*v.micro)
    batch = v.batch
    models = load_models(models_root, device="cuda", dtype=torch.float16, components=("unet", "vae"))
    unet, vae = models.unet, models.vae
    if v.fused:
        fuse_attention_projections(unet)
    t = torch.zeros((1,), dtype=torch.int64, device="cuda")
    tokens = torch.randn(batch, 50, 384, device="cuda", dtype=torch.float16)
    decode = decode_latents.__wrapped__
    runs = {
        "unet": (torch.compile(lambda x: unet(x, t, tokens), dynamic=False, mode=v.mode), (batch, 8, 32, 32)),
        "vae": (torch.compile(lambda x: decode(vae, x), dynamic=False, mode=v.mode), (batch, 4, 32, 32)),
    }
    out = {**v._asdict(), "models": list(v.models)}
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=v.cudnn_benchmark):
        for name in v.models:
            fn, shape = runs[name]
            x = torch.randn(*shape, device="cuda", dtype=torch.float16)
            start = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            out[f"{name}_build_s"] = round(time.perf_counter() - start, 1)
            make = functools.partial(torch.randn, *shape, device="cuda", dtype=torch.float16)
            out[f"{name}_ms_per_frame"] = round(graph_ms(fn, make) / batch, 3)
            out[f"{name}_ms_per_frame_sustained"] = round(graph_ms(fn, make, hot=True) / batch, 3)
            out[f"{name}_kernels"] = kernel_profile(lambda fn=fn, x=x: fn(x), batch)
    if len(v.models) == 2:
        out["fps"] = round(1000 / (out["unet_ms_per_frame"] + out["vae_ms_per_frame"]), 1)
    out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--budget", type=float, default=540)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--sections", type=lambda v: v.split(","))
    parser.add_argument("--variants", type=lambda v: v.split(","))
    parser.add_argument("--engines", type=Path, help="AOT engines of an earlier run to reuse")
    parser.add_argument(
        "--engine-batches", type=lambda v: v.split(","), help="engine_batches, short_chunks: 32,64,64whole"
    )
    parser.add_argument(
        "--chunk-frames",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[75],
        help="short_chunks: 75,1000",
    )
    parser.add_argument("--parts", type=Path, help="aot_parts: packages of an earlier call ($OUT/parts)")
    parser.add_argument(
        "--encoder-configs",
        type=lambda v: [tuple(map(int, c.split("x"))) for c in v.split(",")],
        help="encoders section: ENCODERSxTHREADS,... (default 4x0,4x4,6x0,8x0,8x2,4x0)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"compile": compile_child, "part": part_child}[args.child[0]](*args.child[1:])
        return
    work = br.work_dir("musetalk-probe-", args.engines)
    report = br.Report(args.out, args.budget, sys.argv, args.sections, filename="probe.json")
    Probe(args, work, report).run()
    report.save()


if __name__ == "__main__":
    main()

"""UNet at timestep 0 → VAE decode → uint8 faces, in fixed batch shapes: eager, CUDA graphs, compiled or
ahead-of-time compiled.

Why fixed shapes: every new batch shape costs cuDNN algorithm selection, and a CUDA graph or compiled
kernel exists per shape. Batches are therefore padded up to a small set of bucket sizes (the largest is
the render batch size; a bucket already used is preferred), so a chunk never meets a new shape after
its first batch. The VAE decode runs in slices of at most ``vae.DECODE_BATCH`` frames, one graph each,
and a partial batch decodes only the slices that hold its frames: a larger bucket speeds up the UNet
without holding more decode memory or decoding its padding. Modes:

* ``eager``: the models as they are (launch-bound at small batches);
* ``graphs``: each bucket's UNet and VAE decode captured once into CUDA graphs and replayed; removes the
  launch overhead. A bucket's first batch runs eagerly (it is the warm-up the capture needs) and the
  capture (0.1–0.3 s) comes with its second, so a one-batch clip pays none and its first frame is
  not delayed by one;
* ``compiled``: ``torch.compile`` of both models (Inductor; artifacts cached on disk under
  ``$MUSETALK_CACHE/inductor``, so only the first process per GPU type pays the full compile), then
  captured into CUDA graphs like ``graphs``, with cuDNN autotuning. One bucket only: each extra shape
  would be a recompile. Compiled code is traced and run under ``no_grad`` rather than inference mode,
  whose tensors Inductor mishandles (pytorch/pytorch#180823: "weakref to UntypedStorage" on a
  transpose).
* ``aot``: the same compiled code, built ahead of time (``musetalk_ops.engine``: once per GPU type and
  batch size, then loaded without Inductor); buckets of the render batch and of one decode slice (a
  chunk's tail of at most 32 frames at batch 64 runs a UNet of 32); on CUDA captured into graphs like
  ``graphs`` (first batch of a bucket direct, capture at its second). Also runs on the CPU (no
  graphs), which CI tests. The default on CUDA wherever an engine exists (``render.chunks.resolve_mode``):
  the fastest path, loaded in a fraction of a second, its frames within a few levels of the reference
  path (bench/RESULTS.md).

``compiled`` is never a default: a short clip cannot repay its compile, while ``aot`` gives every process
the compiled speed for a load of a fraction of a second (bench/RESULTS.md).

The constant t = 0 time embedding is not precomputed: it is two tiny matmuls per batch, which the
graphs already replay for free.
"""

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from musetalk_ops.config import cache_dir
from musetalk_ops.engine.load import engine_for
from musetalk_ops.engine.spec import unet_batches
from musetalk_ops.models.unet_model import UNet
from musetalk_ops.models.vae import decode_latents, decode_slices
from musetalk_ops.models.vae_model import VAE
from musetalk_ops.options import GENERATOR_MODES

GRAPH_MODES = ("graphs", "compiled")  # modes that need CUDA
SMALLEST_BUCKET = 4
# cuDNN autotuning costs seconds per process and pays only under compiled code (bench/RESULTS.md).
CUDNN_BENCHMARK = {"eager": False, "graphs": False, "compiled": True, "aot": False}


def bucket_sizes(max_batch: int, mode: str = "graphs") -> tuple[int, ...]:
    """Powers of two from 4 below ``max_batch``, plus ``max_batch`` itself. Compiled code exists per
    shape: ``compiled`` has ``max_batch`` only (another shape would be a recompile), ``aot`` the sizes
    its engine's UNet is built for (``engine.spec.unet_batches``: the batch and one decode slice of it)."""
    if max_batch < 1:
        raise ValueError(f"batch size must be positive, got {max_batch}")
    if mode == "compiled":
        return (max_batch,)
    if mode == "aot":
        return unet_batches(max_batch)
    sizes = {max_batch}
    size = SMALLEST_BUCKET
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


class StageClock:
    """Busy seconds per named stage of device work without synchronising the host.

    On CUDA each stage is bracketed by events that are read once, in ``totals``; on the CPU the work is
    synchronous and a host clock is exact."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._marks.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per stage so far (waits for the recorded device work to finish)."""
        if self._marks:
            self._marks[-1][2].synchronize()
        for name, start, end in self._marks:
            self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
        self._marks.clear()
        return dict(self._seconds)


class _Bucket:
    """Static buffers of one batch shape, and its graphs once captured: the UNet's, and one per decode
    slice (``vae.decode_slices``), so a partial batch decodes only the slices that hold its frames."""

    def __init__(self, size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.size = size
        self.slices, self.slice = decode_slices(size)
        padded = self.slices * self.slice  # > size where the slices do not divide it: zero rows
        self.latents = torch.zeros((size, 8, 32, 32), device=device, dtype=dtype)
        self.tokens = torch.zeros((size, 50, 384), device=device, dtype=dtype)
        self.pred = torch.zeros((padded, 4, 32, 32), device=device, dtype=dtype)
        self.faces = torch.zeros((padded, 256, 256, 3), device=device, dtype=torch.uint8)
        self.graphs: tuple[torch.cuda.CUDAGraph, list[torch.cuda.CUDAGraph]] | None = None
        self.runs = 0  # batches run without graphs

    def rows(self, i: int) -> slice:
        """Decode slice ``i``'s rows."""
        return slice(i * self.slice, (i + 1) * self.slice)


class FaceGenerator:
    """Generates faces for batches of (latents [n,8,32,32], audio tokens [n,50,384]) with n ≤ max_batch.

    Inputs are expected in the models' device and dtype, positional encoding already added. Not
    thread-safe: graphs replay into shared static buffers (one render at a time per generator).
    ``engines``: where ``aot`` finds (or builds) its engine; default ``$MUSETALK_CACHE/engines``.
    """

    def __init__(
        self,
        unet: UNet,
        vae: VAE,
        *,
        mode: str,
        max_batch: int,
        cudnn_benchmark: bool | None = None,
        engines: str | os.PathLike | None = None,
    ) -> None:
        if mode not in GENERATOR_MODES:
            raise ValueError(f"unknown generator mode {mode!r}: use one of {', '.join(GENERATOR_MODES)}")
        self.device, self.dtype = unet.device, unet.dtype
        if mode in GRAPH_MODES and self.device.type != "cuda":
            raise ValueError(f"mode {mode} needs a CUDA device, not {self.device}")
        self.mode, self.max_batch = mode, max_batch
        self.capture = mode in GRAPH_MODES or (mode == "aot" and self.device.type == "cuda")
        self.cudnn_benchmark = CUDNN_BENCHMARK[mode] if cudnn_benchmark is None else cudnn_benchmark
        self.buckets = bucket_sizes(max_batch, mode)
        self.build_seconds = 0.0  # graph capture, compilation and warm-up so far (one-off costs)
        with self._grad_mode():
            timestep = torch.zeros((1,), dtype=torch.int64, device=self.device)
        self._unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda latents, tokens: unet(
            latents, timestep, tokens
        )
        self._vae: Callable[[torch.Tensor], torch.Tensor] = lambda pred: decode_latents(vae, pred)
        if mode == "compiled":
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
            self._unet = torch.compile(self._unet, dynamic=False)
            decode = decode_latents.__wrapped__  # without its inference-mode decorator (see above)
            self._vae = torch.compile(lambda pred: decode(vae, pred), dynamic=False)
        self.engine: str | None = None  # the aot engine's package names
        if mode == "aot":
            start = time.perf_counter()
            engine = engine_for(unet, vae, max_batch, root=engines)
            self._unet, self._vae, self.engine = engine.unet, engine.vae, engine.name
            self.buckets = engine.batches
            self.build_seconds += time.perf_counter() - start
        self._state: dict[int, _Bucket] = {}
        self._pool = None
        self._lock = threading.Lock()

    def bucket(self, n: int) -> int:
        """The bucket a batch of ``n`` frames is padded to: the smallest one already used that holds it,
        else the smallest that holds it. A chunk's last, partial batch so reuses the full bucket: in a
        fresh process a new shape's first run (cuDNN plans, kernel loading) costs more than the padding.
        An engine's buckets are packages built for them: always the smallest that holds the batch, since
        the padding a smaller package saves is saved on every reply and its first run's extra cost is
        paid once per process (bench/RESULTS.md).
        """
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} frames is outside 1..{self.max_batch}")
        used = [size for size in self._state if size >= n]
        if used and self.mode != "aot":
            return min(used)
        return next(size for size in self.buckets if size >= n)

    def _cudnn(self):
        return torch.backends.cudnn.flags(enabled=True, benchmark=self.cudnn_benchmark)

    def _grad_mode(self) -> contextlib.AbstractContextManager:
        """Inference mode for eager and graphs; plain no_grad for compiled code (see the module doc)."""
        if self.mode != "compiled":
            return torch.inference_mode()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        return stack

    def __call__(self, latents: torch.Tensor, tokens: torch.Tensor, clock: StageClock) -> torch.Tensor:
        """uint8 faces [n,256,256,3] on the device. With graphs the result is a view of a static buffer:
        it is valid until the next call (work queued on the same stream is ordered before that)."""
        n = len(latents)
        with self._lock, self._grad_mode():
            size = self.bucket(n)
            state = self._state.get(size) or self._prepare(size)
            state.latents[:n].copy_(latents)
            state.tokens[:n].copy_(tokens)
            slices = -(-n // state.slice)  # the decode slices holding the n frames
            with self._cudnn():
                if state.graphs is None and state.runs and self.capture:
                    self._timed(self._capture, state)
                if state.graphs is not None:
                    with clock("unet"):
                        state.graphs[0].replay()
                    with clock("vae_decode"):
                        for graph in state.graphs[1][:slices]:
                            graph.replay()
                else:
                    with clock("unet"):
                        self._run_unet(state)
                    with clock("vae_decode"):
                        for i in range(slices):
                            self._run_decode(state, i)
                    state.runs += 1
            return state.faces[:n]

    def _prepare(self, size: int) -> _Bucket:
        """Allocate a bucket. Its first batch runs as is (graphs: captured at the second, so a clip of
        one batch never pays a capture, and that first run was the warm-up). Compiled code compiles and
        captures now: the compile is the one-off cost, timed with the capture in ``build_seconds``."""
        state = _Bucket(size, self.device, self.dtype)
        self._state[size] = state
        with self._cudnn():
            if self.mode == "compiled":
                self._timed(self._compile_and_capture, state)
            elif self.mode == "eager" and self.device.type == "cuda" and self.cudnn_benchmark:
                self._timed(self._run, state)  # autotune now
        return state

    def _run_unet(self, state: _Bucket) -> None:
        state.pred[: state.size].copy_(self._unet(state.latents, state.tokens))

    def _run_decode(self, state: _Bucket, i: int) -> None:
        """Decode slice ``i`` of the bucket (one shape per bucket: the engine's own for ``aot``)."""
        rows = state.rows(i)
        state.faces[rows].copy_(self._vae(state.pred[rows]))

    def _run(self, state: _Bucket) -> None:
        """The whole bucket: UNet, then every decode slice."""
        self._run_unet(state)
        for i in range(state.slices):
            self._run_decode(state, i)

    def _timed(self, step: Callable[[_Bucket], object], state: _Bucket) -> None:
        start = time.perf_counter()
        step(state)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.build_seconds += time.perf_counter() - start

    def _compile_and_capture(self, state: _Bucket) -> None:
        # Not Inductor's freezing: frozen graphs bypass the on-disk graph cache, so every process would
        # compile again
        for _ in range(2):  # compile, then let lazy initialisation happen outside the capture
            self._run(state)
        # Inductor keeps a pool of compile processes; idle, they still cost the encoders' CPUs ~3 %
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
        self._capture(state)

    def _capture(self, state: _Bucket) -> None:
        """Capture the bucket's UNet and each decode slice; their kernels have run before (warm-up done).
        Every graph writes into the bucket's static buffers, so nothing of one lives on in the shared pool
        when the next replays."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # buckets never replay at once: share memory

        def captured(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
            graph = torch.cuda.CUDAGraph()
            # thread_local: encoder threads of a running chunk may wait on CUDA events meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step()
            return graph

        unet_graph = captured(lambda: self._run_unet(state))
        decode_graphs = [captured(lambda i=i: self._run_decode(state, i)) for i in range(state.slices)]
        state.graphs = (unet_graph, decode_graphs)

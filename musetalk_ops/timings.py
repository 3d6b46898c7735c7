"""The timing schema of docs/timings.md, shared by the CLI, ``renders/<id>.json``, Dagster and stats."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STAGES = ("audio_features", "unet", "vae_decode", "composite", "encode", "mux", "load")


@dataclass
class Timings:
    """Seconds per stage plus what a person needs to judge them (frames, fps, real-time factor)."""

    audio_features: float = 0.0
    unet: float = 0.0
    vae_decode: float = 0.0
    composite: float = 0.0
    encode: float = 0.0
    mux: float = 0.0
    load: float = 0.0
    total: float = 0.0
    frames: int = 0
    video_seconds: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 0
    weights: str = "official"
    mode: str = ""  # the execution path that rendered (render.chunks.resolve_mode): aot, graphs, reference…
    extra: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, device: "torch.device | None" = None) -> Iterator[None]:
        """Add the wall time of the block to ``name``; synchronises CUDA so GPU work is attributed."""
        sync = _cuda_sync(device)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        if name in STAGES or name == "total":
            setattr(self, name, getattr(self, name) + seconds)
        else:
            self.extra[name] = self.extra.get(name, 0.0) + seconds

    def merge(self, other: "Timings") -> None:
        """Sum stage seconds and frames of a chunk into a request total (total is set by the caller)."""
        for name in STAGES:
            self.add(name, getattr(other, name))
        for name, seconds in other.extra.items():
            self.add(name, seconds)
        self.frames += other.frames

    @property
    def fps(self) -> float:
        return self.frames / self.total if self.total > 0 else 0.0

    @property
    def rtf(self) -> float:
        return self.video_seconds / self.total if self.total > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
        d["fps"] = round(self.fps, 3)
        d["rtf"] = round(self.rtf, 3)
        if extra:
            d["extra"] = {k: round(v, 4) for k, v in extra.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Timings":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def summary(self) -> str:
        """A short human table for the CLI."""
        rows = [(s, getattr(self, s)) for s in (*STAGES, "total")]
        lines = [f"  {name:<15}{seconds:8.3f} s" for name, seconds in rows]
        lines.append(f"  {'frames':<15}{self.frames:8d}    video {self.video_seconds:.2f} s")
        context = [self.device, self.dtype, f"batch {self.batch_size}", self.mode, f"weights {self.weights}"]
        lines.append(
            f"  {'fps':<15}{self.fps:8.2f}    rtf {self.rtf:.2f}x  ({', '.join(filter(None, context))})"
        )
        return "\n".join(lines)


def _cuda_sync(device: "torch.device | None"):
    """A function that waits for ``device``'s queued work (nothing to wait for off CUDA)."""
    if device is None or device.type != "cuda":
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)

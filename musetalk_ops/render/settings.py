"""How to render (``RenderSettings``) and its range checks; imports no torch, so that the Dagster code
location can validate request options without loading the models' stack."""

from dataclasses import dataclass
from pathlib import Path

from musetalk_ops import DEFAULT_BATCH_SIZE
from musetalk_ops.errors import InputError
from musetalk_ops.settings import VERSIONS

GENERATOR_MODES = ("eager", "graphs", "compiled", "aot")  # the fast path's, see generator.FaceGenerator
RENDER_MODES = ("reference", *GENERATOR_MODES)
MAX_ENCODERS = 64


@dataclass
class RenderSettings:
    """How to render; ``None`` means the documented default (device: cuda when available, dtype:
    float16 on CUDA and float32 on the CPU, version: the template's, models: ``$MUSETALK_MODELS``,
    mode: ``aot`` on CUDA where an engine for the GPU and batch size was built, else ``graphs``;
    ``reference`` on the CPU (``chunks.resolve_mode``), encoders: one per ``encoders.CPUS_PER_ENCODER``
    CPUs on the fast path, at most one per ``encoders.SUBSEGMENT_SECONDS`` of video; the reference path
    always encodes on one thread)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    crf: int = 18
    preset: str = "veryfast"
    device: str | None = None
    dtype: str | None = None
    version: str | None = None
    models_root: Path | None = None
    fps: float | None = None
    mode: str | None = None
    encoders: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 1024:
            raise InputError(f"batch size {self.batch_size} is out of range (1-1024)")
        if not 0 <= self.crf <= 51:
            raise InputError(f"crf {self.crf} is out of range (0-51)")
        if self.version is not None and self.version not in VERSIONS:
            raise InputError(f"unknown version {self.version!r}: use v15 or v1")
        if self.fps is not None and not 1 <= self.fps <= 120:
            raise InputError(f"fps {self.fps} is out of range (1-120)")
        if self.mode is not None and self.mode not in RENDER_MODES:
            raise InputError(f"unknown render mode {self.mode!r}: use one of {', '.join(RENDER_MODES)}")
        if self.encoders is not None and not 1 <= self.encoders <= MAX_ENCODERS:
            raise InputError(f"encoders {self.encoders} is out of range (1-{MAX_ENCODERS})")

"""How to render (``RenderSettings``) and its range checks; imports no torch, so that the Dagster code
location can validate request options without loading the models' stack."""

from dataclasses import dataclass, fields
from pathlib import Path

from musetalk_ops.options import OPTIONS


@dataclass
class RenderSettings:
    """How to render; ``None`` means the documented default (device: cuda when available, dtype:
    float16 on CUDA and float32 on the CPU, version: the template's, models: ``$MUSETALK_MODELS``,
    mode: ``aot`` on CUDA where an engine for the GPU and batch size was built, else ``graphs``;
    ``reference`` on the CPU (``chunks.resolve_mode``), encoders: one per ``encoders.CPUS_PER_ENCODER``
    CPUs on the fast path, at most one per ``encoders.SUBSEGMENT_SECONDS`` of video; the reference path
    always encodes on one thread). Each option's type, default and range: ``musetalk_ops.options``."""

    batch_size: int = OPTIONS["batch_size"].default
    crf: int = OPTIONS["crf"].default
    preset: str = OPTIONS["preset"].default
    device: str | None = None
    dtype: str | None = None
    version: str | None = None
    models_root: Path | None = None
    fps: float | None = None
    mode: str | None = None
    encoders: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name in OPTIONS:
                OPTIONS[field.name].check(getattr(self, field.name))

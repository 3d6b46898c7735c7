"""The render options: each one's type, default, allowed values and help, defined once.

``RenderSettings`` checks its fields here, the CLI builds its flags from here, the Dagster
``RenderResource`` takes its defaults and descriptions from here, and a render request's ``options``
(``musetalk submit``, the request sensor, the job) are validated here. Importing it imports no torch.
"""

import argparse
from dataclasses import dataclass

from musetalk_ops import DEFAULT_BATCH_SIZE
from musetalk_ops.config import DTYPE_NAMES
from musetalk_ops.errors import InputError

VERSIONS = ("v15", "v1")  # MuseTalk model versions, newest first
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)
GENERATOR_MODES = ("eager", "graphs", "compiled", "aot")  # the fast path's model runners (generator.py)
RENDER_MODES = ("reference", *GENERATOR_MODES)  # reference: the CPU reference arithmetic
MAX_ENCODERS = 64


@dataclass(frozen=True)
class Option:
    """One render option. ``per_request`` options may be set by a render request; the others are the
    deployment's (CLI flags and ``RenderResource``)."""

    name: str
    kind: type
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None  # with high: the inclusive range of a number
    high: float | None = None
    per_request: bool = False
    warm_fixed: bool = False  # a warm worker's models or buckets depend on it: a request may not change it
    label: str = ""  # how errors name it; default: the name with spaces

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: object) -> None:
        """Raise InputError (one line) unless ``value`` is allowed; ``None`` means the default."""
        if value is None:
            return
        label = self.label or self.name.replace("_", " ")
        kinds = (int, float) if self.kind is float else (self.kind,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise InputError(f"{label} {value!r} has the wrong type (expected {self.kind.__name__})")
        if self.choices is not None and value not in self.choices:
            raise InputError(f"unknown {label} {value!r}: use one of {', '.join(self.choices)}")
        if self.low is not None and not self.low <= value <= self.high:  # NaN is out of every range
            raise InputError(f"{label} {value} is out of range ({self.low:g}-{self.high:g})")

    def add_flag(self, parser: argparse.ArgumentParser, *, with_default: bool = True) -> None:
        """Add ``--name`` to ``parser``; ``with_default=False`` leaves it ``None`` when not given."""
        default = self.default if with_default else None
        shown = f" (default {self.default})" if with_default and self.default is not None else ""
        parser.add_argument(
            self.flag, type=self.kind, choices=self.choices, default=default, help=self.help + shown
        )


OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option(
            "batch_size",
            int,
            DEFAULT_BATCH_SIZE,
            "frames per model batch",
            low=1,
            high=1024,
            per_request=True,
            warm_fixed=True,
        ),
        Option("crf", int, 18, "H.264 quality, 0 (lossless) to 51", low=0, high=51, per_request=True),
        Option("preset", str, "veryfast", "x264 preset", choices=X264_PRESETS, per_request=True),
        Option(
            "fps",
            float,
            None,
            "output fps (default: the template's; images 25)",
            low=1,
            high=120,
            per_request=True,
        ),
        Option("device", str, None, "cpu, cuda or cuda:N (default: cuda when available)"),
        Option("dtype", str, None, "default: float16 on CUDA, float32 on the CPU", choices=DTYPE_NAMES),
        Option(
            "version", str, None, "MuseTalk version (default: the template's, else v15)", choices=VERSIONS
        ),
        Option(
            "mode",
            str,
            None,
            "execution path (default on CUDA: aot where `musetalk engine build` made an engine for this "
            "GPU and batch size, else graphs; on the CPU: reference; aot builds a missing engine)",
            choices=RENDER_MODES,
            label="render mode",
        ),
        Option(
            "encoders",
            int,
            None,
            "parallel H.264 encoders (default: one per 4 CPUs)",
            low=1,
            high=MAX_ENCODERS,
        ),
    )
}
REQUEST_OPTIONS = tuple(name for name, option in OPTIONS.items() if option.per_request)


def check_request_options(options: object) -> dict:
    """A render request's ``options`` object, validated (names, types, ranges)."""
    if not isinstance(options, dict):
        raise InputError(f"options: expected an object, got {type(options).__name__}")
    for name, value in options.items():
        if name not in REQUEST_OPTIONS:
            raise InputError(f"unknown option {name!r} (known: {', '.join(REQUEST_OPTIONS)})")
        OPTIONS[name].check(value)
    return {name: value for name, value in options.items() if value is not None}  # null: the default

"""Per-template settings (``templates/<id>/settings.yaml``), strictly validated.

A typo in a settings file would otherwise silently fall back to a default and produce a
subtly different avatar, so unknown keys, wrong types and out-of-range values are refused
with an error that names the key. ``to_dict()`` is the canonical form that goes into the
template cache manifest and its fingerprint: it holds only what changes the cache, with the
values that are actually applied (e.g. ``bbox_shift`` is 0 for v15, as in the official code).
"""

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import yaml

from musetalk_ops.errors import InputError
from musetalk_ops.options import VERSIONS

PARSING_MODES = ("jaw", "raw")
MASK_SOURCES = ("parsing", "landmarks")
NO_FACE = ("error", "passthrough")
MAX_WELCOME_TEXT = 2000
_INT_RANGES = {
    "bbox_shift": (-100, 100),
    "extra_margin": (0, 40),  # the official Gradio slider's range
    "left_cheek_width": (0, 256),  # cheek rectangles end at 256 ∓ width on the 512² parse map
    "right_cheek_width": (0, 256),
}
_FPS_RANGE = (1.0, 120.0)


@dataclass(frozen=True)
class TemplateSettings:
    """How a template is preprocessed; defaults are the official v1.5 realtime defaults.

    ``face_box`` is a manual landmark box ``[x1, y1, x2, y2]`` *before* ``extra_margin`` (what the
    official landmark step returns); when set, face detection is skipped for every frame.
    ``fps`` applies to image sources only (videos keep their own rate).
    """

    version: str = "v15"
    bbox_shift: int = 0
    extra_margin: int = 10
    parsing_mode: str = "jaw"
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    mask_source: str = "parsing"
    face_box: tuple[int, int, int, int] | None = None
    fps: float = 25.0
    no_face: str = "error"
    welcome_audio: str | None = None
    welcome_text: str | None = None

    def __post_init__(self) -> None:
        _check_choice("version", self.version, VERSIONS)
        for key, (low, high) in _INT_RANGES.items():
            value = getattr(self, key)
            _check_int(key, value)
            if not low <= value <= high:
                raise InputError(f"settings {key}: {value} is out of range [{low}, {high}]")
        _check_choice("parsing_mode", self.parsing_mode, PARSING_MODES)
        _check_choice("mask_source", self.mask_source, MASK_SOURCES)
        _check_choice("no_face", self.no_face, NO_FACE)
        if isinstance(self.fps, bool) or not isinstance(self.fps, int | float) or not math.isfinite(self.fps):
            raise InputError(f"settings fps: expected a number, got {self.fps!r}")
        if not _FPS_RANGE[0] <= self.fps <= _FPS_RANGE[1]:
            low, high = _FPS_RANGE
            raise InputError(f"settings fps: {self.fps} is out of range [{low:g}, {high:g}]")
        object.__setattr__(self, "fps", float(self.fps))
        if self.face_box is not None:
            object.__setattr__(self, "face_box", _check_box(self.face_box))
        self._check_welcome()

    def _check_welcome(self) -> None:
        if self.welcome_audio is not None and self.welcome_text is not None:
            raise InputError("settings welcome_audio and welcome_text: give one of them, not both")
        if self.welcome_text is not None:
            if not isinstance(self.welcome_text, str) or not self.welcome_text.strip():
                raise InputError("settings welcome_text: expected non-empty text")
            if len(self.welcome_text) > MAX_WELCOME_TEXT:
                raise InputError(f"settings welcome_text: longer than {MAX_WELCOME_TEXT} characters")
        if self.welcome_audio is not None:
            name = self.welcome_audio
            if (
                not isinstance(name, str)
                or not name
                or name in (".", "..")
                or "\\" in name
                or PurePosixPath(name).name != name
                or name.startswith(".")
            ):
                raise InputError(
                    f"settings welcome_audio: {name!r} must be a file name inside the template "
                    "directory (no folders)"
                )

    @property
    def shift(self) -> int:
        """The bbox_shift actually applied: v15 ignores it, like the official code."""
        return self.bbox_shift if self.version == "v1" else 0

    @property
    def margin(self) -> int:
        """The extra_margin actually applied (a v1.5 feature; v1 has none)."""
        return self.extra_margin if self.version == "v15" else 0

    @property
    def mode(self) -> str:
        """Parsing mode actually applied: official v1 always uses ``raw``."""
        return self.parsing_mode if self.version == "v15" else "raw"

    @property
    def mask_label(self) -> str:
        """The manifest's ``mask_source`` value."""
        return "landmarks" if self.mask_source == "landmarks" else f"parsing-{self.mode}"

    def notes(self) -> list[str]:
        """One-line notes about settings that are accepted but have no effect."""
        out = []
        if self.version == "v15" and self.bbox_shift != 0:
            out.append(
                f"bbox_shift {self.bbox_shift} is ignored for v15 (as in official MuseTalk v1.5); "
                "adjust face_box or extra_margin instead"
            )
        if self.version == "v1" and self.parsing_mode != "raw":
            out.append("parsing_mode jaw is ignored for v1 (official v1 uses raw)")
        return out

    def to_dict(self) -> dict:
        """Canonical settings that determine the cache (effective values, welcome fields left out)."""
        d = {
            "version": self.version,
            "bbox_shift": self.shift,
            "extra_margin": self.margin,
            "parsing_mode": self.mode,
            "left_cheek_width": self.left_cheek_width,
            "right_cheek_width": self.right_cheek_width,
            "mask_source": self.mask_source,
            "face_box": list(self.face_box) if self.face_box is not None else None,
            "fps": self.fps,
            "no_face": self.no_face,
        }
        return dict(sorted(d.items()))


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"settings {key}: {value!r} is not one of {', '.join(choices)}")


def _check_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"settings {key}: expected an integer, got {value!r}")


def _check_box(value: object) -> tuple[int, int, int, int]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise InputError(f"settings face_box: expected [x1, y1, x2, y2], got {value!r}")
    for v in value:
        _check_int("face_box", v)
    x1, y1, x2, y2 = value
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        raise InputError(f"settings face_box: {list(value)} needs 0 <= x1 < x2 and 0 <= y1 < y2")
    return (x1, y1, x2, y2)


def load_settings(path: str | os.PathLike | None) -> TemplateSettings:
    """Read and validate ``settings.yaml``; ``None`` or an empty file gives the defaults."""
    if path is None:
        return TemplateSettings()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: settings file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read settings ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: invalid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TemplateSettings)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise InputError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return TemplateSettings(**data)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None

"""Object keys of the store layout (docs/template-cache.md §4), built in one place from validated parts.

Request and template ids arrive from users; every helper validates them (and extensions and
fingerprints) before they become part of a key, so a key built here is always a valid store key.
Prefixes end with ``/`` so that listing ``template_prefix("a")`` never matches template ``ab``.
"""

import re

from musetalk_ops.errors import InputError
from musetalk_ops.ids import validate_id

AUDIO_EXTS = ("wav", "flac", "mp3", "m4a", "aac", "ogg")
SOURCE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "mp4", "mov", "webm", "mkv")
MANIFEST = "manifest.json"  # the template cache's manifest file (template_cache.py)
REQUESTS = "requests/"  # request objects, watched by the request sensor
REJECTED = f"{REQUESTS}rejected/"  # requests refused before any run, with their reasons
RENDERS = "renders/"  # finished videos and their records, watched by the direct-render sensor
FAILED = f"{RENDERS}failed/"  # records of renders that failed on a worker
CLAIMS = "claims/"  # one object per request id ever taken: the atomic reservation of the id
TEMPLATE_CACHES = "cache/templates/"  # template caches, and each template's pointer to its current one
POINTER = "current.json"
MAX_CHUNKS = 10000  # chunk numbers are zero-padded to 4 digits so listings sort in frame order

_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def _ext(ext: object, allowed: tuple[str, ...], what: str) -> str:
    """Normalise ``".WAV"``/``"wav"`` to ``"wav"`` and check it against ``allowed``."""
    norm = ext.lower().removeprefix(".") if isinstance(ext, str) else ext
    if norm not in allowed:
        raise InputError(f"unsupported {what} type {ext!r}: use one of {', '.join(allowed)}")
    return norm


def validate_fingerprint(value: object) -> str:
    """A cache fingerprint is exactly 16 lowercase hex digits (docs/template-cache.md §3)."""
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise InputError(f"invalid fingerprint {value!r}: expected 16 lowercase hex digits")
    return value


def template_prefix(tid: str) -> str:
    return f"templates/{validate_id(tid, 'template id')}/"


def template_source(tid: str, ext: str) -> str:
    return f"{template_prefix(tid)}source.{_ext(ext, SOURCE_EXTS, 'template source')}"


def template_settings(tid: str) -> str:
    return f"{template_prefix(tid)}settings.yaml"


def cache_prefix(tid: str, fingerprint: str) -> str:
    return f"{TEMPLATE_CACHES}{validate_id(tid, 'template id')}/{validate_fingerprint(fingerprint)}/"


def cache_manifest(tid: str, fingerprint: str) -> str:
    """The cache's manifest, written last: a cache exists in the store once this object does."""
    return cache_prefix(tid, fingerprint) + MANIFEST


def template_pointer(tid: str) -> str:
    """``current.json``: names the template's current cache; ``template_cache`` writes it last."""
    return f"{TEMPLATE_CACHES}{validate_id(tid, 'template id')}/{POINTER}"


def claim(rid: str) -> str:
    return f"{CLAIMS}{validate_id(rid, 'request id')}.json"


def request(rid: str) -> str:
    return f"{REQUESTS}{validate_id(rid, 'request id')}.json"


def rejected_request(rid: str) -> str:
    return f"{REJECTED}{validate_id(rid, 'request id')}.json"


def rejected_reason(rid: str) -> str:
    return f"{REJECTED}{validate_id(rid, 'request id')}.reason.txt"


def audio(rid: str, ext: str) -> str:
    return f"audio/{validate_id(rid, 'request id')}.{_ext(ext, AUDIO_EXTS, 'audio')}"


def audio_object(value: object) -> str:
    """An audio key a client names (``audio/<name>.<ext>``, a known audio type): never any other object."""
    if not isinstance(value, str) or not value.startswith("audio/") or "." not in value:
        raise InputError(f"audio {value!r}: expected a key audio/<name>.<ext>")
    name, _, ext = value.removeprefix("audio/").rpartition(".")
    return audio(validate_id(name, "audio name"), ext)


def work_prefix(rid: str) -> str:
    return f"work/{validate_id(rid, 'request id')}/"


def work_features(rid: str) -> str:
    return f"{work_prefix(rid)}features.safetensors"


def work_chunk(rid: str, n: int) -> str:
    """``work/<rid>/chunks/0003.mp4``: zero-padded so that a sorted listing is in chunk order."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < MAX_CHUNKS:
        raise InputError(f"invalid chunk number {n!r}: expected an integer 0-{MAX_CHUNKS - 1}")
    return f"{work_prefix(rid)}chunks/{n:04d}.mp4"


def render_video(rid: str) -> str:
    return f"{RENDERS}{validate_id(rid, 'request id')}.mp4"


def render_timings(rid: str) -> str:
    """The render record (timings, template, where it ran), written after the video: it marks it done."""
    return f"{RENDERS}{validate_id(rid, 'request id')}.json"


def failed_render(rid: str) -> str:
    return f"{FAILED}{validate_id(rid, 'request id')}.json"


def welcome_video(tid: str, fingerprint: str) -> str:
    return f"welcome/{validate_id(tid, 'template id')}/{validate_fingerprint(fingerprint)}.mp4"

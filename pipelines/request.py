"""Render request objects (``requests/<id>.json``): their format and validation, shared by the sensor,
the render job and ``musetalk submit``. No Dagster import, so the client stays light."""

import json
from dataclasses import dataclass

from musetalk_ops import keys
from musetalk_ops.errors import InputError
from musetalk_ops.ids import validate_id

TEMPLATE_TAG = "musetalk/template"  # on every render run: per-template usage is one indexed query

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
# Request options a client may set per render; the rest is deployment configuration (RenderResource).
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "batch_size": (int,),
    "crf": (int,),
    "preset": (str,),
    "fps": (int, float),
}
# A request is a few hundred bytes; the cap keeps a hostile object from exhausting a sensor's memory.
MAX_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class RenderRequest:
    """``requests/<id>.json``: ``{"template": "<id>", "audio": "audio/<name>.<ext>", "options": {...}}``."""

    id: str
    template: str
    audio: str
    options: dict

    def to_json(self) -> bytes:
        return json.dumps({"template": self.template, "audio": self.audio, "options": self.options}).encode()


def _audio_key(value: object) -> str:
    """Only ``audio/<id>.<ext>`` with a known audio type: a request never names any other object."""
    if not isinstance(value, str) or not value.startswith("audio/") or "." not in value:
        raise InputError(f"audio {value!r}: expected a key audio/<name>.<ext>")
    name, _, ext = value.removeprefix("audio/").rpartition(".")
    return keys.audio(validate_id(name, "audio name"), ext)


def check_options(options: object) -> dict:
    """Validated per-request render options (types, names, ranges)."""
    if not isinstance(options, dict):
        raise InputError(f"options: expected an object, got {type(options).__name__}")
    for name, value in options.items():
        if name not in OPTION_TYPES:
            raise InputError(f"unknown option {name!r} (known: {', '.join(OPTION_TYPES)})")
        if isinstance(value, bool) or not isinstance(value, OPTION_TYPES[name]):
            raise InputError(f"option {name}: {value!r} has the wrong type")
    if "preset" in options and options["preset"] not in X264_PRESETS:
        raise InputError(f"option preset: {options['preset']!r} is not one of {', '.join(X264_PRESETS)}")
    if options:  # range checks; imported only here so that `musetalk submit` starts quickly
        from musetalk_ops.render.settings import RenderSettings

        RenderSettings(**options)
    return dict(options)


def parse_request(request_id: str, data: bytes) -> RenderRequest:
    """Parse and validate a request object; InputError names what is wrong."""
    validate_id(request_id, "request id")
    if len(data) > MAX_REQUEST_BYTES:
        raise InputError(f"request {request_id}: {len(data)} bytes, over the {MAX_REQUEST_BYTES} byte limit")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8/JSON, or a 5000-digit integer
        raise InputError(f"request {request_id}: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise InputError(f"request {request_id}: expected a JSON object")
    unknown = sorted(set(body) - {"template", "audio", "options"})
    if unknown:
        raise InputError(f"request {request_id}: unknown field {unknown[0]!r}")
    for field in ("template", "audio"):
        if field not in body:
            raise InputError(f"request {request_id}: missing field {field!r}")
    try:
        return RenderRequest(
            id=request_id,
            template=validate_id(body["template"], "template id"),
            audio=_audio_key(body["audio"]),
            options=check_options(body.get("options", {})),
        )
    except InputError as e:
        raise InputError(f"request {request_id}: {e}") from None

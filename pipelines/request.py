"""Render request objects (``requests/<id>.json``): their format and validation, shared by the sensor,
the render job and ``musetalk submit``. No Dagster import, so the client stays light."""

import json
from dataclasses import dataclass

from musetalk_ops import keys
from musetalk_ops.errors import InputError
from musetalk_ops.ids import validate_id
from musetalk_ops.options import check_request_options

TEMPLATE_TAG = "musetalk/template"  # on every render run: per-template usage is one indexed query

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
            audio=keys.audio_object(body["audio"]),
            options=check_request_options(body.get("options", {})),
        )
    except InputError as e:
        raise InputError(f"request {request_id}: {e}") from None

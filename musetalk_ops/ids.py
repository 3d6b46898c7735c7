"""Identifiers that travel from requests into storage keys: validated before any use."""

import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from musetalk_ops.errors import InputError

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid id (``[a-z0-9][a-z0-9_-]{0,63}``), else raise InputError.

    Ids become path components and object keys, so nothing else (dots, slashes, unicode,
    upper case) is accepted.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InputError(
            f"invalid {what} {shown}: use 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def default_template_id(source: Path) -> str:
    """An id for a template file: ``templates/<id>/source.png`` → ``<id>``; ``Alice Smith.png`` →
    ``alice-smith`` (so a file can be rendered without naming it)."""
    stem = source.parent.name if source.stem == "source" else source.stem
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "-" for c in stem.lower())
    return validate_id(cleaned.strip("-_")[:64] or "template", "template id")


def new_request_id() -> str:
    """A fresh, sortable request id: ``r<UTC yyyymmddHHMMSS>-<8 hex>``."""
    return f"r{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{secrets.token_hex(4)}"

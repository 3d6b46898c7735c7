"""Identifiers that travel from requests into storage keys: validated before any use."""

import re

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

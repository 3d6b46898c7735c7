"""User-facing errors.

Anything a user can cause (bad input, missing weights, a stale cache) raises a subclass of
``MuseTalkError`` whose message is one self-contained line; the CLI prints it and exits 2, a
Dagster step fails with the same message. Everything else is a bug and keeps its traceback.
"""


class MuseTalkError(Exception):
    """Base class: ``str(error)`` is the one line shown to the user."""


class InputError(MuseTalkError):
    """Bad user input: unreadable, empty, corrupt or out-of-limits media, invalid ids or options."""


class ModelFilesError(MuseTalkError):
    """A weights file is missing, unreadable or does not match the expected architecture."""


class CacheError(MuseTalkError):
    """A template cache is missing, partial, stale or damaged."""


class StoreError(MuseTalkError):
    """The object store is unreachable or an object is missing."""


class GpuMemoryError(MuseTalkError):
    """The GPU has no room for the render even at batch size 1."""


class EngineError(MuseTalkError):
    """An ahead-of-time compiled engine cannot be built or does not run on this machine."""

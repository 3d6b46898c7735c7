"""Opening what a render is given as its template: a template cache, an official avatar, or a source."""

import dataclasses
from pathlib import Path

from musetalk_ops.config import Limits, models_dir
from musetalk_ops.errors import InputError
from musetalk_ops.ids import ID_PATTERN, default_template_id
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import Template, load_template


def open_template(path: Path, settings: RenderSettings, limits: Limits | None = None) -> Template:
    """A template cache directory, an official realtime avatar directory, a source image/video, or the id
    of a template prepared in the store (its current cache, through ``cache/templates/<id>/current.json``).

    A source file is prepared on the fly (with the ``settings.yaml`` beside it, if any) into the local
    cache (``$MUSETALK_CACHE/templates/<id>/<fingerprint>/``), so rendering it again reuses that work.
    """
    path = Path(path)
    if path.is_dir():
        return load_template(path)
    if not path.exists() and ID_PATTERN.fullmatch(str(path)):
        from musetalk_ops.store import open_store
        from musetalk_ops.template_store import current_cache, local_cache

        store = open_store()
        return load_template(local_cache(store, current_cache(store, str(path))))
    if not path.is_file():
        raise InputError(f"template not found: {path}")
    from musetalk_ops.prepare import prepare_to_cache  # cv2 and the face detector: only a source needs them
    from musetalk_ops.settings import load_settings

    beside = path.parent / "settings.yaml"
    template_settings = load_settings(beside if beside.is_file() else None)
    if settings.version is not None:
        template_settings = dataclasses.replace(template_settings, version=settings.version)
    cache = prepare_to_cache(
        path,
        template_id=default_template_id(path),
        settings=template_settings,
        models_root=models_dir(settings.models_root),
        device=settings.device,
        dtype=settings.dtype,
        limits=limits,
    )
    return load_template(cache)

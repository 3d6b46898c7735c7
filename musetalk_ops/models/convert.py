"""Half-precision safetensors copies of the UNet (``musetalk models convert``).

The official UNet is a 3.4 GB fp32 pickle; a render in fp16/bf16 needs half of it. A converted copy lives
under ``<cache>/converted/<first 16 hex of the source's sha256>/unet.<dtype>.safetensors`` and records the
full source sha256 in its metadata. It is found through the on-disk hash memo, which is keyed by the
source's path, size and mtime: a replaced or edited source misses the memo and loads from the original,
so a stale copy can never shadow it. The VAE (335 MB) and whisper-tiny (151 MB) load in well under a
second from their official files, so they are not converted.
"""

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from musetalk_ops import config
from musetalk_ops.errors import InputError
from musetalk_ops.files import atomic_path
from musetalk_ops.models.layout import (
    VERSIONS,
    ModelLayout,
    cached_sha256,
    check_file,
    file_sha256,
    read_state_dict,
)

log = logging.getLogger(__name__)

FORMAT = "musetalk-converted/1"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def converted_path(source_sha256: str, dtype: torch.dtype, cache: str | os.PathLike | None = None) -> Path:
    return (
        config.cache_dir(cache)
        / "converted"
        / source_sha256[:16]
        / f"unet.{config.dtype_name(dtype)}.safetensors"
    )


def load_converted(
    source: Path, dtype: torch.dtype, device: torch.device | str, cache: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], Path] | None:
    """The converted state dict of ``source`` for ``dtype``, read straight onto ``device``, or None."""
    if dtype not in HALF_DTYPES:
        return None
    sha = cached_sha256(source, cache)
    if sha is None:
        return None
    path = converted_path(sha, dtype, cache)
    if not path.is_file():
        return None
    want = {"format": FORMAT, "source_sha256": sha, "dtype": config.dtype_name(dtype)}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            if f.metadata() != want:
                log.warning("ignoring %s: it was not made from %s", path, source)
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, path  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        log.warning("ignoring damaged converted weights %s (%s); loading %s", path, e, source)
        return None


def convert_models(
    root: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    *,
    versions: tuple[str, ...] | None = None,
    dtype: torch.dtype = torch.float16,
) -> list[Path]:
    """Write (or keep, when already valid) a ``dtype`` safetensors copy of each UNet; returns their paths.

    ``versions`` defaults to every version whose UNet is present; naming one that is absent is an error.
    """
    if dtype not in HALF_DTYPES:
        raise InputError(f"convert to float16 or bfloat16, not {config.dtype_name(dtype)}")
    layout = ModelLayout(root)
    if versions is None:
        versions = tuple(v for v in VERSIONS if layout.unet_weights(v).is_file()) or ("v15",)
    written = []
    for version in versions:
        source = layout.unet_weights(version)
        check_file(source, layout.root)
        found = load_converted(source, dtype, "cpu", cache)
        if found is not None:
            written.append(found[1])
            continue
        sha = file_sha256(source, cache)
        out = converted_path(sha, dtype, cache)
        state = {k: v.to(dtype).contiguous() for k, v in read_state_dict(source).items()}
        with atomic_path(out) as tmp:
            save_file(
                state,
                tmp,
                metadata={"format": FORMAT, "source_sha256": sha, "dtype": config.dtype_name(dtype)},
            )
        log.info("converted %s → %s", source, out)
        written.append(out)
    return written

"""The official MuseTalk weights directory: file names, checks, fingerprints, strict state-dict loading.

Everything that touches a weights file goes through here, so a missing, truncated or foreign file
fails the same way everywhere: one ``ModelFilesError`` line naming the file and what to do.
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from musetalk_ops import config
from musetalk_ops.errors import InputError, ModelFilesError
from musetalk_ops.files import sha256_file, write_atomic
from musetalk_ops.options import VERSIONS

COMPONENTS = ("unet", "vae", "whisper", "bisenet")
DEMO_MARKER = "musetalk-demo.json"

# Fixed by the MuseTalk architecture (8 latent channels in: masked ‖ reference; 384-d Whisper tokens).
UNET_INVARIANTS = {"in_channels": 8, "out_channels": 4, "cross_attention_dim": 384}

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
TORCH_MAGICS = (_ZIP_MAGIC, b"\x80")  # zip archive, or a legacy torch.save pickle stream
_LFS_MAGIC = b"version https://git-lfs"


class ModelLayout:
    """Paths of the official layout (docs/reference.md §1.1) under one models directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def unet_dir(self, version: str) -> Path:
        return self.root / {"v15": "musetalkV15", "v1": "musetalk"}[check_version(version)]

    def unet_config(self, version: str) -> Path:
        return self.unet_dir(version) / "musetalk.json"

    def unet_weights(self, version: str) -> Path:
        return self.unet_dir(version) / {"v15": "unet.pth", "v1": "pytorch_model.bin"}[version]

    @property
    def vae_dir(self) -> Path:
        return self.root / "sd-vae"

    @property
    def vae_config(self) -> Path:
        return self.vae_dir / "config.json"

    @property
    def vae_weights(self) -> Path:
        return self.vae_dir / "diffusion_pytorch_model.bin"

    @property
    def whisper_dir(self) -> Path:
        return self.root / "whisper"

    @property
    def whisper_files(self) -> tuple[Path, Path, Path]:
        d = self.whisper_dir
        return d / "config.json", d / "pytorch_model.bin", d / "preprocessor_config.json"

    @property
    def bisenet_weights(self) -> Path:
        return self.root / "face-parse-bisent" / "79999_iter.pth"

    @property
    def resnet_weights(self) -> Path:
        return self.root / "face-parse-bisent" / "resnet18-5c106cde.pth"

    @property
    def demo_marker(self) -> Path:
        return self.root / DEMO_MARKER

    def files(self, component: str, version: str = "v15") -> tuple[Path, ...]:
        """Every file ``component`` needs, in the official names."""
        if component == "unet":
            return self.unet_config(version), self.unet_weights(version)
        if component == "vae":
            return self.vae_config, self.vae_weights
        if component == "whisper":
            return self.whisper_files
        if component == "bisenet":
            return self.bisenet_weights, self.resnet_weights
        raise InputError(f"unknown model component {component!r}: use {', '.join(COMPONENTS)}")

    def template_files(self) -> tuple[Path, ...]:
        """The files a template cache depends on (VAE latents, BiSeNet masks): what ``fingerprint`` names."""
        return self.vae_config, self.vae_weights, self.bisenet_weights


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise InputError(f"unknown model version {version!r}: use {' or '.join(VERSIONS)}")
    return version


def weights_kind(root: str | os.PathLike) -> str:
    """``"demo"`` when ``root`` carries the marker written by ``write_demo_models``, else ``"official"``."""
    return "demo" if ModelLayout(root).demo_marker.is_file() else "official"


def _remedy(root: Path) -> str:
    if weights_kind(root) == "demo":
        return f"run `musetalk models demo {root}` again"
    return f"run `musetalk models download {root}` or copy the official files there"


def check_models(
    root: str | os.PathLike,
    version: str = "v15",
    components: Iterable[str] = COMPONENTS,
) -> None:
    """Fail fast, before anything heavy loads, on a missing, empty, LFS-pointer or foreign file."""
    layout = ModelLayout(root)
    check_version(version)
    components = tuple(components)
    if not layout.root.is_dir():
        raise ModelFilesError(
            f"models directory {layout.root} does not exist (run `musetalk models download {layout.root}`, "
            f"or `musetalk models demo {layout.root}` for random demo weights)"
        )
    for component in components:
        for path in layout.files(component, version):
            check_file(path, layout.root)
    if "unet" in components:
        _check_unet_config(layout.unet_config(version), layout.root)


def check_file(path: Path, root: Path) -> None:
    """A weights/config file exists and is no obvious impostor (empty file, Git LFS pointer, HTML page)."""
    if not path.is_file():
        raise ModelFilesError(f"missing weights file {path} ({_remedy(root)})")
    with path.open("rb") as f:
        head = f.read(32)
    if not head:
        raise ModelFilesError(f"weights file {path} is empty ({_remedy(root)})")
    if head.startswith(_LFS_MAGIC):
        raise ModelFilesError(
            f"{path} is a Git LFS pointer, not the weights (run `git lfs pull`, or {_remedy(root)})"
        )
    if path.suffix in (".pth", ".bin", ".pt") and not head.startswith(TORCH_MAGICS):
        raise ModelFilesError(f"{path} is not a PyTorch weights file ({_remedy(root)})")


def _check_unet_config(path: Path, root: Path) -> None:
    cfg = read_json(path)
    for key, want in UNET_INVARIANTS.items():
        if cfg.get(key) != want:
            raise ModelFilesError(
                f"{path} is not a MuseTalk UNet config ({key} is {cfg.get(key)!r}, expected {want}; "
                f"{_remedy(root)})"
            )


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFilesError(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} does not hold a JSON object")
    return data


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --- state dicts ---------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` without code execution; zip-format files are memory-mapped (no copy until used)."""
    with path.open("rb") as f:
        mmap = f.read(4) == _ZIP_MAGIC  # the pre-1.6 pickle format cannot be mapped
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any failure to unpickle is a property of the file
        raise ModelFilesError(f"cannot read weights file {path}: {_one_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFilesError(f"{path} does not hold a state dict of tensors")
    return state


def state_dict_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """A short description of how two ``{key: shape}`` maps differ, or None when they agree."""

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {list(found[k])} vs {list(expected[k])}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({first(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} wrong shapes ({first(shapes)})")
    return "; ".join(parts) or None


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load every key with the right shape or raise; ``assign`` adopts the (mapped) tensors without a copy."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problem = state_dict_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ModelFilesError(
            f"{path} does not fit the {type(module).__name__} architecture: {problem} "
            f"(damaged or another model's file; replace it)"
        )
    module.load_state_dict(state, strict=True, assign=True)


def ready(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Cast after loading (so fp32 computes in fp32 whatever the file stores), eval mode, no gradients.

    ``nn.Module.to`` directly: library models (transformers' whisper) override ``to`` with checks and
    warnings that do not apply here.
    """
    return nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


# --- content hashes, memoised on disk ------------------------------------------------------------------


def _memo_path(cache: str | os.PathLike | None) -> Path:
    return config.cache_dir(cache) / "hashes.json"


def _memo_read(cache: str | os.PathLike | None) -> dict:
    try:
        memo = json.loads(_memo_path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _stat_key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_sha256(path: Path, cache: str | os.PathLike | None = None) -> str | None:
    """The memoised sha256 of ``path`` if this file state (size, mtime) was hashed before; never hashes."""
    key, stat = _stat_key(path)
    entry = _memo_read(cache).get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stat.items()):
        return entry.get("sha256")
    return None


def file_sha256(path: Path, cache: str | os.PathLike | None = None) -> str:
    """sha256 of a file's content; a 3.4 GB UNet is hashed once per (path, size, mtime) and remembered."""
    known = cached_sha256(path, cache)
    if known:
        return known
    key, stat = _stat_key(path)
    sha = sha256_file(path)
    if _stat_key(path) != (key, stat):  # changed while being read: do not remember a torn state
        return sha
    memo_file = _memo_path(cache)
    memo = _memo_read(cache)
    memo[key] = {**stat, "sha256": sha}
    with contextlib.suppress(OSError):  # the memo only saves time: an unwritable cache must not stop a render
        write_atomic(memo_file, lambda f: f.write(json.dumps(memo, indent=0, sort_keys=True).encode()))
    return sha


def weights_fingerprint(
    root: str | os.PathLike, files: Iterable[str | os.PathLike], cache: str | os.PathLike | None = None
) -> str:
    """16 hex naming the content of ``files`` (relative to ``root`` or inside it); ``"demo"`` for demo sets.

    Names are taken relative to the root, so moving a models directory keeps its fingerprint.
    """
    root = Path(root)
    if weights_kind(root) == "demo":
        return "demo"
    entries = []
    for file in files:
        path = root / file
        check_file(path, root)
        entries.append((Path(os.path.relpath(path, root)).as_posix(), file_sha256(path, cache)))
    digest = hashlib.sha256()
    for name, sha in sorted(entries):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()[:16]

"""Fetch the official weights into the official layout (``musetalk models download DIR``).

UNet, VAE and whisper-tiny come from Hugging Face; the face-parsing files from their published
locations. ``79999_iter.pth`` is published only on Google Drive (id below), which may refuse automated
downloads: ``$MUSETALK_FACE_PARSE_URL`` points the download at a mirror instead. Every file lands
under a temporary name and is renamed into place only after its sha256 (where known) or, for the
BiSeNet checkpoint, its full key/shape list has been verified. Without network the command fails
within seconds (one reachability probe, no retry loops), naming the first missing file.
"""

import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from musetalk_ops.errors import InputError, ModelFilesError
from musetalk_ops.files import atomic_path, sha256_file
from musetalk_ops.models.layout import (
    TORCH_MAGICS,
    ModelLayout,
    check_file,
    check_version,
    file_sha256,
    read_state_dict,
    state_dict_mismatch,
    weights_kind,
)

log = logging.getLogger(__name__)

FACE_PARSE_URL_ENV = "MUSETALK_FACE_PARSE_URL"
FACE_PARSE_GDRIVE_ID = "154JgKpzCPW82qINcVieuPH3fZ2e0P812"
GDRIVE_URL = (
    f"https://drive.usercontent.google.com/download?id={FACE_PARSE_GDRIVE_ID}&export=download&confirm=t"
)
RESNET18_URL = "https://download.pytorch.org/models/resnet18-5c106cde.pth"
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Source:
    """Where one layout file comes from; ``sha256`` may be a prefix (torchvision names carry 8 hex)."""

    target: str  # path under the models directory
    repo: str | None = None  # Hugging Face repo id, with ``filename`` inside it
    filename: str | None = None
    url: str | None = None
    sha256: str | None = None


def sources(versions: Iterable[str] = ("v15",)) -> list[Source]:
    unet = {
        "v15": [
            Source("musetalkV15/musetalk.json", "TMElyralab/MuseTalk", "musetalkV15/musetalk.json"),
            Source(
                "musetalkV15/unet.pth",
                "TMElyralab/MuseTalk",
                "musetalkV15/unet.pth",
                sha256="7ebf6c98c181e20838e4c0054e96e944ac60d5d692cc01db42839fe11b787007",
            ),
        ],
        "v1": [
            Source("musetalk/musetalk.json", "TMElyralab/MuseTalk", "musetalk/musetalk.json"),
            Source("musetalk/pytorch_model.bin", "TMElyralab/MuseTalk", "musetalk/pytorch_model.bin"),
        ],
    }
    files = [s for v in dict.fromkeys(versions) for s in unet[check_version(v)]]
    vae, whisper = "stabilityai/sd-vae-ft-mse", "openai/whisper-tiny"
    files += [
        Source("sd-vae/config.json", vae, "config.json"),
        Source("sd-vae/diffusion_pytorch_model.bin", vae, "diffusion_pytorch_model.bin", sha256="1b4889b6"),
        Source("whisper/config.json", whisper, "config.json"),
        Source("whisper/pytorch_model.bin", whisper, "pytorch_model.bin"),
        Source("whisper/preprocessor_config.json", whisper, "preprocessor_config.json"),
        Source("face-parse-bisent/resnet18-5c106cde.pth", url=RESNET18_URL, sha256="5c106cde"),
        Source("face-parse-bisent/79999_iter.pth", url=os.environ.get(FACE_PARSE_URL_ENV) or GDRIVE_URL),
    ]
    return files


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _is_present(path: Path, source: Source, root: Path) -> bool:
    try:
        check_file(path, root)
    except ModelFilesError:
        return False
    if source.sha256 and not file_sha256(path).startswith(source.sha256):
        log.warning("%s does not have the published sha256; downloading it again", path)
        return False
    return True


def _probe(url: str, what: str, target: Path) -> None:
    """One short request: any HTTP answer means reachable; DNS, refusal or timeout fails now, no retries."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=CONNECT_TIMEOUT).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ModelFilesError(
            f"cannot reach {what} ({reason}) to fetch {target}: check the network or proxy, "
            f"or copy the official files into {target.parent}"
        ) from None


def _fetch_hub(source: Source, tmp: Path) -> None:
    from huggingface_hub import hf_hub_download

    scratch = tmp.with_suffix(".d")  # hf_hub_download keeps bookkeeping files beside what it writes
    try:
        got = hf_hub_download(
            source.repo,
            source.filename,
            local_dir=scratch,
            endpoint=_endpoint(),
            etag_timeout=CONNECT_TIMEOUT,
        )
        os.replace(got, tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fetch_url(source: Source, tmp: Path) -> None:
    with urllib.request.urlopen(source.url, timeout=CONNECT_TIMEOUT) as response, tmp.open("xb") as f:
        shutil.copyfileobj(response, f, 8 << 20)


def _verify(source: Source, tmp: Path, target: Path) -> None:
    with tmp.open("rb") as f:
        head = f.read(8)
    if target.suffix in (".pth", ".bin") and not head.startswith(TORCH_MAGICS):
        raise ModelFilesError(f"the download for {target} is not a PyTorch weights file (an error page?)")
    if source.sha256:
        sha = sha256_file(tmp)
        if not sha.startswith(source.sha256):
            raise ModelFilesError(
                f"the download for {target} has sha256 {sha[:16]}…, expected {source.sha256}…"
            )
    if target.name == "79999_iter.pth":
        from musetalk_ops.models.bisenet import BiSeNet

        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in BiSeNet().state_dict().items()}
        problem = state_dict_mismatch(expected, {k: tuple(v.shape) for k, v in read_state_dict(tmp).items()})
        if problem:
            raise ModelFilesError(
                f"the download for {target} is not the BiSeNet face-parsing checkpoint: {problem}"
            )


def download_models(root: str | os.PathLike, *, versions: Iterable[str] = ("v15",)) -> list[Path]:
    """Fetch every missing or damaged file of the official layout; returns the paths written."""
    layout = ModelLayout(root)
    if layout.root.exists() and weights_kind(layout.root) == "demo":
        raise InputError(
            f"{layout.root} holds demo weights; download the official ones into another directory"
        )
    todo = [(s, layout.root / s.target) for s in sources(versions)]
    todo = [(s, p) for s, p in todo if not _is_present(p, s, layout.root)]
    if not todo:
        return []
    first = todo[0][1]
    if _offline():
        raise ModelFilesError(
            f"HF_HUB_OFFLINE is set, so {len(todo)} missing model files cannot be downloaded "
            f"(first: {first}); unset it or copy the official files into {layout.root}"
        )
    if any(s.repo for s, _ in todo):
        _probe(_endpoint(), "Hugging Face", first)
    written = []
    for source, target in todo:
        where = f"{source.repo}/{source.filename}" if source.repo else source.url
        log.info("downloading %s → %s", where, target)
        try:
            with atomic_path(target) as tmp:
                if source.repo:
                    _fetch_hub(source, tmp)
                else:
                    _fetch_url(source, tmp)
                _verify(source, tmp, target)
        except Exception as e:  # network and hub errors, whatever their class: name the file and the way out
            if isinstance(e, ModelFilesError):
                message = str(e)
            else:
                line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                message = f"cannot download {target} from {where}: {line}"
            if target.name == "79999_iter.pth":
                message += (
                    f"; download https://drive.google.com/file/d/{FACE_PARSE_GDRIVE_ID} by hand into "
                    f"{target.parent}, or set ${FACE_PARSE_URL_ENV} to a mirror"
                )
            raise ModelFilesError(message) from None
        written.append(target)
    return written

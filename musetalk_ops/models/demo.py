"""Seeded random-weight models in the exact official layout (``musetalk models demo DIR``).

They exercise the real loaders, file names and formats where the official weights cannot be
downloaded. The UNet and VAE are narrow versions of the official architectures (same block types,
latent shapes and token sizes); whisper has tiny's encoder shape; BiSeNet is full size (its
architecture is fixed) with batch-norm statistics measured on smooth random images, so its
activations stay in a sane range, and a head biased towards "skin" so blending masks are not
empty. Outputs are meaningless and are labelled ``weights: "demo"``.
"""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from musetalk_ops.errors import InputError
from musetalk_ops.files import write_atomic
from musetalk_ops.models.bisenet import BiSeNet
from musetalk_ops.models.layout import COMPONENTS, VERSIONS, ModelLayout, weights_kind
from musetalk_ops.models.unet import OFFICIAL_UNET_CONFIG, build_unet
from musetalk_ops.models.vae import OFFICIAL_VAE_CONFIG, build_vae

DEMO_UNET_CONFIG = {**OFFICIAL_UNET_CONFIG, "block_out_channels": [32, 64, 64, 64]}

# The official sd-vae-ft-mse config, narrower (official widths 128/256/512/512, 2 layers per block).
DEMO_VAE_CONFIG = {**OFFICIAL_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}

DEMO_WHISPER_CONFIG = {  # whisper-tiny's encoder; a token-sized decoder (unused by MuseTalk)
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "vocab_size": 128,
    "max_target_positions": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
}


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    # Saving to a file object names the archive "archive", so equal seeds give byte-equal files.
    write_atomic(path, lambda f: torch.save(state, f))


def _save_json(data: dict, path: Path) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def _smooth_images(n: int, size: int) -> torch.Tensor:
    """ImageNet-normalised-looking inputs with image-like spatial correlation (upsampled coarse noise)."""
    return F.interpolate(torch.randn(n, 3, size // 32, size // 32), size=(size, size), mode="bilinear")


def _bisenet_state() -> dict[str, torch.Tensor]:
    model = BiSeNet()
    for m in model.modules():  # cumulative averages over the calibration batch
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(_smooth_images(2, 256))
        # The main head reads post-ReLU (non-negative) features: positive weights for "skin" (class 1)
        # make the demo parser call most of a face skin, so demo renders visibly composite the lower
        # face like real weights do instead of producing empty blending masks.
        head = model.conv_out.conv_out.weight
        head[1] = head[1].abs() + head.abs().mean()
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _resnet18_state(bisenet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ResNet-18 key names (2017 file: no ``num_batches_tracked``), plus its 1000-class fc."""
    prefix = "cp.resnet."
    state = {
        k[len(prefix) :]: torch.randn_like(v.float()).half()
        for k, v in bisenet.items()
        if k.startswith(prefix) and not k.endswith("num_batches_tracked")
    }
    state["fc.weight"] = (torch.randn(1000, 512) * 0.02).half()
    state["fc.bias"] = torch.zeros(1000, dtype=torch.float16)
    return state


def write_demo_models(root: str | os.PathLike, seed: int = 0) -> None:
    """Write every component for both UNet versions; each file atomically, the demo marker first."""
    layout = ModelLayout(root)
    present = [p for c in COMPONENTS for v in VERSIONS for p in layout.files(c, v) if p.exists()]
    if present and weights_kind(root) != "demo":
        raise InputError(
            f"{layout.root} already holds model files ({present[0]}); use an empty directory for demo weights"
        )
    _save_json(
        {
            "kind": "musetalk-demo",
            "seed": seed,
            "note": "seeded random weights in the official layout, for tests and demos: outputs mean nothing",
        },
        layout.demo_marker,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for version in VERSIONS:  # different random weights per version, the same shapes
            _save_json(DEMO_UNET_CONFIG, layout.unet_config(version))
            _save_tensors(build_unet(DEMO_UNET_CONFIG, "demo").state_dict(), layout.unet_weights(version))

        _save_json(DEMO_VAE_CONFIG, layout.vae_config)
        _save_tensors(build_vae(DEMO_VAE_CONFIG, "demo").state_dict(), layout.vae_weights)

        config_file, weights_file, preprocessor_file = layout.whisper_files
        whisper_config = WhisperConfig(
            **DEMO_WHISPER_CONFIG, architectures=["WhisperForConditionalGeneration"]
        )
        whisper = WhisperForConditionalGeneration(whisper_config)
        _save_json(whisper_config.to_dict(), config_file)
        _save_tensors({k: v.half() for k, v in whisper.state_dict().items()}, weights_file)
        features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
        write_atomic(preprocessor_file, lambda f: f.write(features.to_json_string().encode()))

        bisenet = _bisenet_state()
        _save_tensors(bisenet, layout.bisenet_weights)
        _save_tensors(_resnet18_state(bisenet), layout.resnet_weights)

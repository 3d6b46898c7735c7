"""whisper-tiny encoder and its log-mel front end (docs/reference.md §1.3, §4.1), from local files only."""

import os
from dataclasses import dataclass

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
from transformers.utils import logging as hf_logging

from musetalk_ops.errors import ModelFilesError
from musetalk_ops.models.layout import ModelLayout, check_models, read_state_dict, ready, state_dict_mismatch


@dataclass
class WhisperEncoder:
    feature_extractor: WhisperFeatureExtractor
    encoder: HFWhisperEncoder
    device: torch.device
    dtype: torch.dtype


def _encoder_mismatch(layout: ModelLayout) -> str | None:
    """How the checkpoint's encoder tensors differ from what ``config.json`` builds (decoder keys ignored)."""
    config_file, weights_file, _ = layout.whisper_files
    try:
        config = WhisperConfig.from_pretrained(layout.whisper_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"cannot read {config_file}: {e}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WhisperModel(config).encoder.state_dict().items()}
    found = {}
    for key, tensor in read_state_dict(weights_file).items():
        for prefix in ("model.encoder.", "encoder."):  # ForConditionalGeneration or bare WhisperModel file
            if key.startswith(prefix):
                found[key[len(prefix) :]] = tuple(tensor.shape)
    return state_dict_mismatch(expected, found)


def load_whisper(root: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> WhisperEncoder:
    """Only the encoder is kept: its keys are checked strictly first, decoder and LM-head keys are ignored."""
    check_models(root, components=("whisper",))
    layout = ModelLayout(root)
    problem = _encoder_mismatch(layout)
    if problem:
        raise ModelFilesError(
            f"{layout.whisper_files[1]} does not fit its config.json: {problem} (replace the files)"
        )
    directory = str(layout.whisper_dir)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the decoder-only differences it would report do not matter here
    hf_logging.disable_progress_bar()
    try:
        model = WhisperModel.from_pretrained(directory, local_files_only=True)
        features = WhisperFeatureExtractor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        line = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise ModelFilesError(f"cannot load whisper from {directory}: {line}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    device = torch.device(device)
    encoder = ready(model.encoder, device, dtype)
    return WhisperEncoder(feature_extractor=features, encoder=encoder, device=device, dtype=dtype)

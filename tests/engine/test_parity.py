"""The whole chain, image → ``musetalk prepare --bbox`` → ``musetalk render --frames-dir``, against an
independent reference: diffusers' VAE and UNet, transformers' Whisper and the documented arithmetic
(docs/reference.md §3–§5), fp32 on the CPU with demo weights (issue #23)."""

import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import soundfile
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from helpers import png_frames
from PIL import Image
from transformers import WhisperFeatureExtractor, WhisperModel

from engine.test_nets import diffusers_kwargs, official_latents
from musetalk_ops.models.layout import ModelLayout, read_json, read_state_dict

BBOX = (177, 66, 272, 175)  # the astronaut's face, before extra_margin
EXTRA_MARGIN = 10
FPS = 25


def musetalk(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=600,
    )


def reference_audio_tokens(models, wav: np.ndarray) -> torch.Tensor:
    """§4.1–4.2 at 25 fps for audio under 30 s: [T, 50, 384] with the positional encoding added."""
    layout = ModelLayout(models)
    extractor = WhisperFeatureExtractor.from_pretrained(layout.whisper_dir)
    encoder = WhisperModel.from_pretrained(layout.whisper_dir).encoder.float().eval()  # as .to(fp32)
    mel = extractor(wav, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        out = encoder(mel, output_hidden_states=True)
    # embedding output, outputs of layers 0–2, layer_norm(output of layer 3)
    states = torch.stack([*out.hidden_states[:4], out.last_hidden_state], dim=2)[0]  # [1500, 5, 384]
    states = states[: math.floor(len(wav) / 16000 * 50)]
    padded = torch.cat([torch.zeros(4, 5, 384), states, torch.zeros(12, 5, 384)])
    frames = math.floor(len(wav) / 16000 * FPS)
    tokens = torch.stack([padded[2 * i : 2 * i + 10].reshape(50, 384) for i in range(frames)])
    position = torch.arange(50, dtype=torch.float32)[:, None]
    inverse = torch.exp(torch.arange(0, 384, 2, dtype=torch.float32) * (-math.log(10000.0) / 384))
    pe = torch.zeros(50, 384)
    pe[:, 0::2] = torch.sin(position * inverse)
    pe[:, 1::2] = torch.cos(position * inverse)
    return tokens + pe


def reference_faces(models, latents: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """§5.2 and §3.2: UNet at timestep 0, then decode → RGB uint8 [T, 256, 256, 3]."""
    layout = ModelLayout(models)
    unet = UNet2DConditionModel(**diffusers_kwargs(read_json(layout.unet_config("v15")))).eval()
    unet.load_state_dict(read_state_dict(layout.unet_weights("v15")))
    vae = AutoencoderKL.from_pretrained(layout.vae_dir).eval()
    batch = latents.expand(len(tokens), -1, -1, -1).contiguous()  # one template frame: every frame's
    with torch.no_grad():
        pred = unet(batch, torch.tensor([0]), encoder_hidden_states=tokens).sample
        images = vae.decode(pred / 0.18215).sample
    images = (images / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def reference_frame(frame: np.ndarray, face: np.ndarray, box, mask: np.ndarray) -> np.ndarray:
    """§3.3 and the realtime ``get_image_blending`` (PIL): resize the face into its box (INTER_LINEAR),
    paste it into the crop box's region, paste that region onto the frame through the mask."""
    x1, y1, x2, y2 = box
    s = int(max(x2 - x1, y2 - y1) // 2 * 1.5)
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    crop_box = (xc - s, yc - s, xc + s, yc + s)
    body = Image.fromarray(frame)
    region = body.crop(crop_box)
    region.paste(Image.fromarray(cv2.resize(face, (x2 - x1, y2 - y1))), (x1 - crop_box[0], y1 - crop_box[1]))
    body.paste(region, crop_box[:2], Image.fromarray(mask).convert("L"))
    return np.asarray(body)


def test_prepare_and_render_match_the_official_computation(
    tmp_path, astronaut_png, astronaut_rgb, short_speech, demo_models
):
    diffusers_logging.set_verbosity_error()
    cache, frames_dir = tmp_path / "cache", tmp_path / "frames"
    flags = ("--models", demo_models, "--device", "cpu", "--dtype", "float32")
    prepared = musetalk("prepare", astronaut_png, "--out", cache, "--bbox", ",".join(map(str, BBOX)), *flags)
    assert prepared.returncode == 0, prepared.stderr
    rendered = musetalk(
        "render", "--template", cache, "--audio", short_speech, "--out", tmp_path / "out.mp4",
        "--frames-dir", frames_dir, "--no-progress", *flags,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    ours = np.stack(list(png_frames(frames_dir).values()))

    box = (BBOX[0], BBOX[1], BBOX[2], min(BBOX[3] + EXTRA_MARGIN, astronaut_rgb.shape[0]))
    assert json.loads((cache / "manifest.json").read_text())["faces"][0]["face_box"] == list(box)
    x1, y1, x2, y2 = box
    bgr = np.ascontiguousarray(astronaut_rgb[..., ::-1])
    crop = cv2.resize(bgr[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    reference_vae = AutoencoderKL.from_pretrained(ModelLayout(demo_models).vae_dir).eval()
    latents = official_latents(reference_vae, crop)
    wav, rate = soundfile.read(short_speech, dtype="float32")
    assert rate == 16000 and wav.ndim == 1  # librosa.load(sr=16000) returns these samples unchanged
    faces = reference_faces(demo_models, latents, reference_audio_tokens(demo_models, wav))
    # The blending mask comes from the cache: BiSeNet parsing and the mask arithmetic have their own
    # parity tests (test_models, test_masks); this test follows the latents through UNet and decode.
    with np.load(cache / "masks.npz") as npz:
        mask = npz["mask_00000"]
    want = np.stack([reference_frame(astronaut_rgb, face, box, mask) for face in faces])

    assert ours.shape == want.shape == (15, 512, 512, 3)
    diff = np.abs(ours.astype(np.int16) - want)
    assert diff.max() <= 2 and (diff > 1).mean() <= 0.005, (diff.max(), (diff > 1).mean())
    assert (want != astronaut_rgb).mean() > 0.02  # the face was really replaced


def test_every_model_input_is_contiguous_nchw(tmp_path, astronaut_png, short_speech, demo_models):
    """Each model gets its tensors in the memory format its parity tests validate (contiguous): the VAE
    encoder and BiSeNet while preparing; Whisper, the UNet and the VAE decoder while rendering."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from musetalk_ops.models.bisenet import BiSeNet
    from musetalk_ops.models.unet_model import UNet
    from musetalk_ops.models.vae_model import Decoder, Encoder
    from musetalk_ops.prepare import prepare_template
    from musetalk_ops.render.file import render_file
    from musetalk_ops.render.settings import RenderSettings
    from musetalk_ops.settings import TemplateSettings

    watched = (Encoder, Decoder, UNet, BiSeNet, WhisperEncoder)
    seen: dict[str, list[bool]] = {}

    def record(module, args):
        if isinstance(module, watched):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            seen.setdefault(type(module).__name__, []).extend(t.is_contiguous() for t in tensors)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        cache = prepare_template(
            astronaut_png,
            tmp_path / "cache",
            template_id="astronaut",
            settings=TemplateSettings(face_box=list(BBOX)),
            models_root=demo_models,
            device="cpu",
            dtype="float32",
        )
        settings = RenderSettings(device="cpu", dtype="float32", models_root=demo_models)
        render_file(cache, short_speech, tmp_path / "out.mp4", settings, progress=False)
    finally:
        handle.remove()
    assert sorted(seen) == sorted(cls.__name__ for cls in watched)
    assert all(all(flags) for flags in seen.values()), seen

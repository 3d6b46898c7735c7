"""Our re-creation of how the official ``realtime_inference.py`` (docs/reference.md §5–6) spends
its time, for side-by-side ratios in ``bench.render``. Written from the reference's description, not copied.

Main thread: batches of 20 (``datagen``) → positional encoding → eager fp16 UNet at t = 0 → VAE decode →
``.cpu()`` numpy BGR faces → an unbounded queue; UNet and VAE are diffusers' models, as in the official
script, holding the weights ours loaded. One consumer thread per frame: ``cv2.resize`` to the face box,
``copy.deepcopy`` of the full frame, ``get_image_blending`` with PIL (two full-frame ``fromarray``, crop,
paste, masked paste, ``np.array``), ``cv2.imwrite`` of a PNG. The timer spans the loop and the join,
as the official one does. Then a separate pass encodes the PNGs (the official runs ffmpeg; here the same
x264 settings as ours through ``SegmentWriter``, so the ratio is not inflated by a slower preset).
"""

import copy
import dataclasses
import queue
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from musetalk_ops.audio import AudioFeatures, add_positional_encoding
from musetalk_ops.blend import frame_indices
from musetalk_ops.models import Models
from musetalk_ops.models.unet import load_unet
from musetalk_ops.models.vae import VAE_SCALE, load_vae
from musetalk_ops.template_cache import Template
from musetalk_ops.video import SegmentWriter

BATCH = 20


def _official_blend(image_bgr, face_bgr, face_box, mask_bgr, crop_box):
    """``get_image_blending`` as the reference describes it (PIL, full-frame copies)."""
    body = Image.fromarray(image_bgr[:, :, ::-1])
    face = Image.fromarray(face_bgr[:, :, ::-1])
    x, y, x1, y1 = face_box
    x_s, y_s = crop_box[0], crop_box[1]
    face_large = body.crop(tuple(crop_box))
    mask = Image.fromarray(mask_bgr).convert("L")
    face_large.paste(face, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, (x_s, y_s), mask)
    return np.array(body)[:, :, ::-1]


class OfficialAvatar:
    """The official avatar's in-memory lists (BGR frames, boxes, 3-channel masks, fp16 latents) as the
    realtime script holds them after loading its cache; every frame of ``template`` must have a face."""

    def __init__(self, template: Template, models: Models) -> None:
        cycle = frame_indices(0, 2 * len(template.frames), len(template.frames), template.cycle)
        if template.cycle == "none":
            cycle = cycle[: len(template.frames)]
        self.frames = [template.frames[k][:, :, ::-1].copy() for k in cycle]
        self.boxes = [template.faces[k].face_box for k in cycle]
        self.crop_boxes = [template.faces[k].crop_box for k in cycle]
        self.masks = [np.repeat(template.masks[k][:, :, None], 3, axis=2) for k in cycle]
        self.latents = [template.latents[k : k + 1].to(models.device, models.dtype) for k in cycle]


def official_models(root: Path, models: Models) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """diffusers' UNet and VAE (what the official script runs) with the weights under ``root``, as stored
    (the engine's own models have their upsamplers folded), on the engine's device and dtype.

    Our configs carry diffusers' argument names, so they build the same architectures."""
    twins = []
    for ours, cls in (
        (load_unet(root, models.version, models.device, models.dtype), UNet2DConditionModel),
        (load_vae(root, models.device, models.dtype), AutoencoderKL),
    ):
        with torch.device("meta"):
            model = cls(**dataclasses.asdict(ours.config))
        model.load_state_dict(ours.state_dict(), strict=True, assign=True)
        twins.append(model.eval())
    return twins[0], twins[1]


def _decode_official(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    image = vae.decode((latents / VAE_SCALE).to(vae.dtype)).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype("uint8")[..., ::-1]


@torch.inference_mode()
def run_baseline(
    official: tuple[UNet2DConditionModel, AutoencoderKL],
    avatar: OfficialAvatar,
    features: AudioFeatures,
    fps: float,
    frames: int,
    png_dir: Path | None,
) -> float:
    """Seconds for ``frames`` frames, GPU work + paste-back (+ PNG writes when ``png_dir`` is given), with
    the ``official_models``."""
    unet, vae = official
    device = unet.device
    whisper = features.windows(fps, 0, frames).to(device, unet.dtype)  # up front, as official (fp16)
    timestep = torch.tensor([0], device=device)
    results: queue.Queue = queue.Queue()
    n = len(avatar.frames)

    def process_frames() -> None:
        for idx in range(frames):
            res = results.get(block=True, timeout=60)
            x1, y1, x2, y2 = avatar.boxes[idx % n]
            ori = copy.deepcopy(avatar.frames[idx % n])
            res = cv2.resize(res.astype(np.uint8), (x2 - x1, y2 - y1))
            combined = _official_blend(
                ori, res, avatar.boxes[idx % n], avatar.masks[idx % n], avatar.crop_boxes[idx % n]
            )
            if png_dir is not None:
                cv2.imwrite(str(png_dir / f"{idx:08d}.png"), combined)

    start = time.perf_counter()
    consumer = threading.Thread(target=process_frames)
    consumer.start()
    for lo in range(0, frames, BATCH):
        hi = min(frames, lo + BATCH)
        tokens = add_positional_encoding(whisper[lo:hi])
        latents = torch.cat([avatar.latents[i % n] for i in range(lo, hi)]).to(unet.dtype)
        pred = unet(latents, timestep, encoder_hidden_states=tokens).sample
        for face in _decode_official(vae, pred.to(vae.dtype)):
            results.put(face)
    consumer.join()
    return time.perf_counter() - start


def encode_pngs(png_dir: Path, out: Path, fps: float, crf: int, preset: str) -> float:
    """The separate encode pass over the written PNGs; returns seconds."""
    start = time.perf_counter()
    files = sorted(png_dir.glob("*.png"))
    first = cv2.imread(str(files[0]))
    with SegmentWriter(out, fps, first.shape[1], first.shape[0], crf=crf, preset=preset) as writer:
        for file in files:
            writer.write(cv2.imread(str(file))[:, :, ::-1])
    return time.perf_counter() - start

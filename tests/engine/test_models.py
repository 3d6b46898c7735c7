"""Model files: official layout, strict loading, dtypes, VAE/BiSeNet arithmetic, download, conversion."""

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from musetalk_ops.errors import InputError, ModelFilesError
from musetalk_ops.files import TEMP_SUFFIX
from musetalk_ops.models import download as download_mod
from musetalk_ops.models import load_models
from musetalk_ops.models.bisenet import BiSeNet, load_bisenet, parse_faces
from musetalk_ops.models.convert import convert_models
from musetalk_ops.models.demo import write_demo_models
from musetalk_ops.models.layers import Attention
from musetalk_ops.models.layout import (
    DEMO_MARKER,
    ModelLayout,
    check_models,
    weights_fingerprint,
    weights_kind,
)
from musetalk_ops.models.unet import OFFICIAL_UNET_CONFIG, build_unet, load_unet, unet_predict
from musetalk_ops.models.vae import VAE_SCALE, decode_latents, encode_crops, load_vae
from musetalk_ops.models.whisper import load_whisper

# Key names and shapes of the official BiSeNet checkpoint (copied from shared/docs).
KEYS_JSON = Path(__file__).parents[1] / "data" / "bisenet-79999_iter-keys.json"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Hash memo and converted weights go to a per-test cache, never the user's."""
    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def clone(src: Path, dst: Path, *, marker: bool = True) -> Path:
    """Cheap copy of a models directory (hard links); tests replace files, never edit them in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    if not marker:
        (dst / DEMO_MARKER).unlink()
    return dst


def replace_tensors(path: Path, state: dict) -> None:
    path.unlink()  # break the hard link before writing
    torch.save(state, path)


def file_tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)


# --- architecture -------------------------------------------------------------------------------------


def test_bisenet_keys_and_shapes_equal_the_official_checkpoint():
    official = {k: list(v) for k, v in json.loads(KEYS_JSON.read_text())["keys"].items()}
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in BiSeNet().state_dict().items()}
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: ours[k] for k in official} == official


def test_official_unet_config_has_8_heads_and_850m_parameters():
    with torch.device("meta"):
        unet = build_unet(OFFICIAL_UNET_CONFIG, "official")
    attentions = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert len(attentions) == 32  # 2 per transformer block × (6 down + 9 up + 1 mid)
    assert {m.heads for m in attentions.values()} == {8}  # legacy `attention_head_dim` = head count
    widths = {m.to_q.out_features // m.heads for m in attentions.values()}
    assert widths == {40, 80, 160}  # 320/640/1280 channels over 8 heads
    cross = [m for n, m in attentions.items() if n.endswith("attn2")]
    assert {m.to_k.in_features for m in cross} == {384}  # 50 Whisper tokens × 384
    params = sum(p.numel() for p in unet.parameters())
    assert abs(params - 849.9e6) < 0.1e6, params


# --- layout checks ------------------------------------------------------------------------------------


def test_check_models_names_the_missing_file(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m", marker=False)
    check_models(root)  # complete
    (root / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(ModelFilesError) as err:
        check_models(root, "v15")
    message = str(err.value)
    assert "\n" not in message
    assert str(root / "musetalkV15" / "unet.pth") in message
    assert f"musetalk models download {root}" in message
    check_models(root, "v1")  # the v1 files are still there
    check_models(root, "v15", components=("vae", "whisper", "bisenet"))

    with pytest.raises(ModelFilesError, match=r"resnet18-5c106cde\.pth"):
        (root / "face-parse-bisent" / "resnet18-5c106cde.pth").unlink()
        check_models(root, "v1", components=("bisenet",))
    with pytest.raises(ModelFilesError, match="does not exist"):
        check_models(tmp_path / "nowhere")
    with pytest.raises(InputError, match="v2"):
        check_models(root, "v2")


def test_check_models_spots_impostor_files(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m", marker=False)
    vae = root / "sd-vae" / "diffusion_pytorch_model.bin"
    vae.unlink()
    vae.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:1b4889b6\nsize 334707217\n")
    with pytest.raises(ModelFilesError, match="Git LFS pointer"):
        check_models(root, components=("vae",))
    vae.unlink()
    vae.write_text("<html>Google Drive - quota exceeded</html>")
    with pytest.raises(ModelFilesError, match="not a PyTorch weights file"):
        check_models(root, components=("vae",))
    vae.unlink()
    vae.touch()
    with pytest.raises(ModelFilesError, match="is empty"):
        check_models(root, components=("vae",))

    config = root / "musetalkV15" / "musetalk.json"
    config.unlink()
    config.write_text(json.dumps({**OFFICIAL_UNET_CONFIG, "in_channels": 4}))
    with pytest.raises(ModelFilesError, match="in_channels is 4, expected 8"):
        check_models(root, components=("unet",))


def test_demo_directory_suggests_regenerating_demo(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    (root / "whisper" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelFilesError, match=re.escape(f"musetalk models demo {root}")):
        check_models(root, components=("whisper",))


# --- UNet ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "weights"), [("v15", "musetalkV15/unet.pth"), ("v1", "musetalk/pytorch_model.bin")]
)
def test_unet_loads_every_tensor_of_the_official_files(demo_models, version, weights):
    unet = load_unet(demo_models, version, "cpu", torch.float32)
    stored = file_tensors(demo_models / weights)
    ours = unet.state_dict()
    assert ours.keys() == stored.keys()
    assert all(torch.equal(ours[k], stored[k]) for k in stored)
    assert not unet.training
    assert not any(p.requires_grad for p in unet.parameters())
    assert not any(t.is_meta for t in [*unet.parameters(), *unet.buffers()])


def test_v1_and_v15_are_different_weights(demo_models):
    a = file_tensors(demo_models / "musetalkV15/unet.pth")["conv_in.weight"]
    b = file_tensors(demo_models / "musetalk/pytorch_model.bin")["conv_in.weight"]
    assert not torch.equal(a, b)


def test_fp16_file_loaded_as_float32_computes_in_float32(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "musetalkV15" / "unet.pth"
    half = {k: v.half() for k, v in file_tensors(weights).items()}
    replace_tensors(weights, half)

    unet = load_unet(root, "v15", "cpu", torch.float32)
    assert {p.dtype for p in unet.parameters()} == {torch.float32}

    reference = build_unet(read_config(root), "reference")  # fp32 from the start, given the upcast weights
    reference.load_state_dict({k: v.float() for k, v in half.items()})
    reference.eval()
    g = torch.Generator().manual_seed(1)
    latents, tokens = torch.randn(1, 8, 32, 32, generator=g), torch.randn(1, 50, 384, generator=g)
    with torch.no_grad():
        want = reference(latents, torch.tensor([0]), tokens)
    got = unet_predict(unet, latents, tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def read_config(root: Path) -> dict:
    return json.loads((root / "musetalkV15" / "musetalk.json").read_text())


def test_unet_predict_shape_dtype_and_timestep_zero(demo_models):
    unet = load_unet(demo_models, "v15", "cpu", torch.float32)
    g = torch.Generator().manual_seed(2)
    latents, tokens = torch.randn(2, 8, 32, 32, generator=g), torch.randn(2, 50, 384, generator=g)
    seen = []
    unet.time_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    out = unet_predict(unet, latents.double(), tokens.half())  # inputs are cast to the UNet's dtype
    assert out.shape == (2, 4, 32, 32) and out.dtype == torch.float32
    assert seen[0].dtype == torch.int64 and seen[0].tolist() == [0, 0]  # timestep 0, broadcast to the batch
    with torch.no_grad():
        want = unet(latents, torch.tensor([0]), tokens.half().float())
    torch.testing.assert_close(out, want)


def test_unet_loads_in_half_precision(demo_models):
    unet = load_unet(demo_models, "v1", "cpu", torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    stored = file_tensors(demo_models / "musetalk" / "pytorch_model.bin")
    torch.testing.assert_close(unet.conv_in.weight, stored["conv_in.weight"].bfloat16(), rtol=0, atol=0)


def test_mismatched_unet_state_dict_is_a_one_line_error(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "musetalkV15" / "unet.pth"
    state = file_tensors(weights)
    state.pop("conv_out.bias")
    state["conv_in.weight"] = state["conv_in.weight"][:, :4]  # a 4-channel (plain SD) UNet
    state["extra.weight"] = torch.zeros(1)
    replace_tensors(weights, state)
    with pytest.raises(ModelFilesError) as err:
        load_unet(root, "v15", "cpu", torch.float32)
    message = str(err.value)
    assert "\n" not in message
    assert str(weights) in message
    assert (
        "conv_out.bias" in message and "extra.weight" in message and "conv_in.weight [32, 4, 3, 3]" in message
    )


def test_unreadable_weights_file_is_a_model_files_error(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "musetalkV15" / "unet.pth"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ModelFilesError, match="cannot read weights file"):
        load_unet(root, "v15", "cpu", torch.float32)


# --- VAE -----------------------------------------------------------------------------------------------


def test_vae_encode_uses_posterior_mean_and_masks_the_lower_half(demo_models):
    vae = load_vae(demo_models, "cpu", torch.float32)
    images = crops(1)
    seen = []
    hook = vae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    latents = encode_crops(vae, images)
    hook.remove()
    assert latents.shape == (1, 8, 32, 32) and latents.dtype == torch.float32
    torch.testing.assert_close(encode_crops(vae, images), latents, rtol=0, atol=0)  # deterministic

    assert [tuple(t.shape) for t in seen] == [(1, 3, 256, 256)] * 2  # one image per call
    assert all(t.is_contiguous() for t in seen)  # NCHW, as the official input computes
    x = torch.cat(seen)
    full = images.astype(np.float32) / np.float32(255) * 2 - 1  # independent: numpy, NHWC
    masked = full.copy()
    masked[:, 128:] = -1
    np.testing.assert_array_equal(x[:1].permute(0, 2, 3, 1).numpy(), masked)
    assert (x[:1, :, 128:] == -1).all()
    np.testing.assert_allclose(x[1:].permute(0, 2, 3, 1).numpy(), full, atol=1e-6)

    with torch.no_grad():  # one image per call (CPU numerics depend on the batch) from the numpy input
        moments = torch.cat(
            [
                vae.quant_conv(vae.encoder(torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()))
                for image in (masked, full)
            ]
        )
    mean, logvar = moments.chunk(2, dim=1)
    torch.testing.assert_close(latents[:, :4], mean[:1] * VAE_SCALE, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents[:, 4:], mean[1:] * VAE_SCALE, rtol=1e-5, atol=1e-6)
    assert (torch.exp(logvar / 2) > 1e-3).all()  # a sample would differ from the mean


def test_vae_decode_arithmetic(demo_models):
    vae = load_vae(demo_models, "cpu", torch.float32)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3)) * 2
    faces = decode_latents(vae, latents)
    assert faces.shape == (1, 256, 256, 3) and faces.dtype == torch.uint8
    with torch.no_grad():
        raw = vae.decode(latents / VAE_SCALE).numpy()
    clipped = np.clip(raw / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
    want = np.round(clipped * np.float32(255)).astype(np.uint8)
    assert (raw < -1).any() and (raw > 1).any()  # the clamp is exercised
    np.testing.assert_array_equal(faces.numpy(), want)


def test_vae_state_dict_mismatch_and_legacy_attention_names(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "sd-vae" / "diffusion_pytorch_model.bin"
    state = file_tensors(weights)
    legacy = {  # sd-vae-ft-mse (2022) stores the mid-block attention under its old names
        k.replace("to_q", "query")
        .replace("to_k", "key")
        .replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in state.items()
    }
    assert legacy.keys() != state.keys()
    replace_tensors(weights, legacy)
    vae = load_vae(root, "cpu", torch.float32)
    torch.testing.assert_close(vae.state_dict(), state, rtol=0, atol=0)

    del legacy["decoder.conv_in.weight"]
    replace_tensors(weights, legacy)
    with pytest.raises(ModelFilesError, match=r"decoder\.conv_in\.weight") as err:
        load_vae(root, "cpu", torch.float32)
    assert "\n" not in str(err.value)


# --- whisper -------------------------------------------------------------------------------------------


def test_whisper_encoder_loads_fp16_file_as_float32(demo_models):
    whisper = load_whisper(demo_models, "cpu", torch.float32)
    assert whisper.dtype == torch.float32 and whisper.device == torch.device("cpu")
    assert {p.dtype for p in whisper.encoder.parameters()} == {torch.float32}
    stored = file_tensors(demo_models / "whisper" / "pytorch_model.bin")
    for name, tensor in whisper.encoder.state_dict().items():
        torch.testing.assert_close(tensor, stored[f"model.encoder.{name}"].float(), rtol=0, atol=0)
    assert whisper.feature_extractor.feature_size == 80
    assert whisper.feature_extractor.sampling_rate == 16000
    with torch.no_grad():
        states = whisper.encoder(torch.zeros(1, 80, 3000), output_hidden_states=True).hidden_states
    assert len(states) == 5 and states[-1].shape == (1, 1500, 384)


def test_whisper_encoder_keys_are_strict_decoder_keys_ignored(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "whisper" / "pytorch_model.bin"
    state = file_tensors(weights)
    fc2 = state.pop("model.encoder.layers.3.fc2.weight")
    replace_tensors(weights, state)
    with pytest.raises(ModelFilesError, match=r"1 missing keys \(layers\.3\.fc2\.weight\)"):
        load_whisper(root, "cpu", torch.float32)
    replace_tensors(weights, {**state, "model.encoder.layers.3.fc2.weight": fc2.T})
    with pytest.raises(ModelFilesError, match=r"layers\.3\.fc2\.weight \[1536, 384\] vs \[384, 1536\]"):
        load_whisper(root, "cpu", torch.float32)
    del state["model.decoder.layers.0.fc1.weight"]  # the decoder is not used: not checked
    replace_tensors(weights, {**state, "model.encoder.layers.3.fc2.weight": fc2})
    load_whisper(root, "cpu", torch.float32)


# --- BiSeNet -------------------------------------------------------------------------------------------


def test_parse_faces_labels_and_preprocessing(demo_models, astronaut_rgb):
    model = load_bisenet(demo_models, "cpu", torch.float32)
    images = [astronaut_rgb[40:300, 120:380], astronaut_rgb[:100, :150]]  # any size → 512²
    labels = parse_faces(model, images)
    assert labels.shape == (2, 512, 512) and labels.dtype == np.uint8
    assert labels.max() < 19

    # independent preprocessing: PIL bilinear to 512², /255, ImageNet mean/std, in numpy
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = np.stack([np.asarray(Image.fromarray(im).resize((512, 512), Image.BILINEAR)) for im in images])
    x = (x.astype(np.float32) / 255 - mean) / std
    with torch.no_grad():  # one contiguous NCHW image per call, as the official parser (ToTensor)
        logits = torch.cat(
            [model(torch.from_numpy(x[i : i + 1]).permute(0, 3, 1, 2).contiguous()) for i in range(2)]
        )
    assert logits.shape == (2, 19, 512, 512)
    np.testing.assert_array_equal(labels, logits.argmax(1).numpy())
    assert (labels == 1).mean() > 0.5  # the demo head favours skin so demo blending masks are not empty


def test_bisenet_main_head_is_upsampled_with_aligned_corners(demo_models):
    model = load_bisenet(demo_models, "cpu", torch.float32)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        feat8, context8, _ = model.cp(x)
        small = model.conv_out(model.ffm(feat8, context8))
        got = model(x)
    assert small.shape[-1] == 16
    torch.testing.assert_close(got, F.interpolate(small, (128, 128), mode="bilinear", align_corners=True))


def test_bisenet_loads_legacy_format_checkpoint(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "face-parse-bisent" / "79999_iter.pth"
    state = file_tensors(weights)
    weights.unlink()
    torch.save(state, weights, _use_new_zipfile_serialization=False)  # 2019-era torch.save
    model = load_bisenet(root, "cpu", torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model.state_dict()["ffm.conv2.weight"], state["ffm.conv2.weight"].float())


# --- demo weights, kinds, fingerprints ---------------------------------------------------------------


def test_demo_models_are_deterministic_and_marked(demo_models, tmp_path):
    again = tmp_path / "again"
    write_demo_models(again, seed=0)
    files = sorted(p.relative_to(demo_models) for p in demo_models.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (demo_models / name).read_bytes() == (again / name).read_bytes(), name
    marker = json.loads((demo_models / DEMO_MARKER).read_text())
    assert marker["seed"] == 0 and marker["note"]
    assert sum(p.stat().st_size for p in demo_models.rglob("*") if p.is_file()) < 120e6
    assert not list(demo_models.rglob(f"*{TEMP_SUFFIX}"))
    resnet = file_tensors(demo_models / "face-parse-bisent" / "resnet18-5c106cde.pth")
    assert (
        resnet["fc.weight"].shape == (1000, 512) and resnet["layer4.1.bn2.running_var"].dtype == torch.float16
    )


def test_demo_refuses_a_directory_with_official_files(demo_models, tmp_path):
    root = clone(demo_models, tmp_path / "m", marker=False)
    with pytest.raises(InputError, match="already holds model files"):
        write_demo_models(root)


def test_weights_kind_and_fingerprint(demo_models, tmp_path, private_cache):
    assert weights_kind(demo_models) == "demo"
    files = ModelLayout(demo_models).template_files()
    assert weights_fingerprint(demo_models, files) == "demo"

    a = clone(demo_models, tmp_path / "a", marker=False)
    b = clone(demo_models, tmp_path / "b", marker=False)
    assert weights_kind(a) == "official"
    fa = weights_fingerprint(a, ModelLayout(a).template_files())
    assert len(fa) == 16 and int(fa, 16) >= 0
    assert weights_fingerprint(b, ModelLayout(b).template_files()) == fa  # content, not location

    memo = json.loads((private_cache / "hashes.json").read_text())
    bisenet = (a / "face-parse-bisent" / "79999_iter.pth").resolve()
    assert memo[str(bisenet)]["sha256"] == hashlib.sha256(bisenet.read_bytes()).hexdigest()

    # the memo is trusted while size and mtime match, and re-checked when they change
    memo[str(bisenet)]["sha256"] = "0" * 64
    (private_cache / "hashes.json").write_text(json.dumps(memo))
    assert weights_fingerprint(a, ModelLayout(a).template_files()) != fa
    os.utime(bisenet, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert weights_fingerprint(a, ModelLayout(a).template_files()) == fa

    data = bytearray((b / "sd-vae" / "config.json").read_bytes())
    (b / "sd-vae" / "config.json").unlink()
    (b / "sd-vae" / "config.json").write_bytes(data.replace(b"silu", b"SiLU"))
    assert weights_fingerprint(b, ModelLayout(b).template_files()) != fa


def test_load_models_components(demo_models):
    models = load_models(
        demo_models, version="v1", device="cpu", dtype=torch.float32, components=("vae", "bisenet")
    )
    assert models.unet is None and models.whisper is None
    assert isinstance(models.bisenet, BiSeNet) and models.vae is not None
    assert (models.weights, models.fingerprint, models.version) == ("demo", "demo", "v1")
    assert models.device == torch.device("cpu") and models.dtype == torch.float32


# --- conversion ----------------------------------------------------------------------------------------


def test_converted_copy_is_used_for_fp16_and_never_shadows_a_changed_source(
    demo_models, tmp_path, monkeypatch
):
    root = clone(demo_models, tmp_path / "m")
    weights = root / "musetalkV15" / "unet.pth"
    original = file_tensors(weights)
    (out,) = convert_models(root, versions=("v15",))
    assert out.suffix == ".safetensors" and out.is_relative_to(tmp_path / "cache" / "converted")
    assert convert_models(root, versions=("v15",)) == [out]  # a valid copy is kept
    assert len(convert_models(root)) == 2  # default: every version present

    import musetalk_ops.models.unet as unet_mod

    def no_pickle(path):
        raise AssertionError(f"read {path}")

    with monkeypatch.context() as m:
        m.setattr(unet_mod, "read_state_dict", no_pickle)
        unet = load_unet(root, "v15", "cpu", torch.float16)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    torch.testing.assert_close(unet.state_dict(), {k: v.half() for k, v in original.items()}, rtol=0, atol=0)
    assert load_unet(root, "v15", "cpu", torch.float32).conv_in.weight.dtype == torch.float32

    changed = {k: v + 1 for k, v in original.items()}
    replace_tensors(weights, changed)
    unet = load_unet(root, "v15", "cpu", torch.float16)  # the stale copy must not be used
    torch.testing.assert_close(unet.conv_in.weight, changed["conv_in.weight"].half(), rtol=0, atol=0)


# --- download ------------------------------------------------------------------------------------------


def test_download_offline_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelFilesError) as err:
        download_mod.download_models(root)
    assert time.monotonic() - start < 2
    assert "HF_HUB_OFFLINE" in str(err.value) and "musetalkV15/musetalk.json" in str(err.value)
    assert not root.exists() or not any(root.rglob("*"))


def test_download_unreachable_hub_fails_within_seconds(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    root = tmp_path / "models"
    start = time.monotonic()
    with pytest.raises(ModelFilesError, match="cannot reach Hugging Face"):
        download_mod.download_models(root)
    assert time.monotonic() - start < 5
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server (the same urllib code path as an HTTPS mirror); yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_face_parse_from_mirror_verifies_and_renames(demo_models, tmp_path, monkeypatch, http_dir):
    served, base = http_dir
    shutil.copy(demo_models / "face-parse-bisent" / "79999_iter.pth", served / "bisenet.pth")
    (served / "page.html").write_text("<html>Google Drive can't scan this file</html>")
    shutil.copy(demo_models / "sd-vae" / "config.json", served / "config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    root = tmp_path / "models"

    def only(source):
        monkeypatch.setattr(download_mod, "sources", lambda versions: [source])

    target = "face-parse-bisent/79999_iter.pth"
    only(download_mod.Source(target, url=f"{base}/page.html"))
    with pytest.raises(ModelFilesError, match="MUSETALK_FACE_PARSE_URL"):
        download_mod.download_models(root)
    only(download_mod.Source(target, url=f"{base}/config.json"))  # a torch-looking name, wrong content
    with pytest.raises(ModelFilesError, match="not a PyTorch weights file"):
        download_mod.download_models(root)
    only(
        download_mod.Source(
            "face-parse-bisent/resnet18-5c106cde.pth", url=f"{base}/bisenet.pth", sha256="5c106cde"
        )
    )
    with pytest.raises(ModelFilesError, match="expected 5c106cde"):
        download_mod.download_models(root)
    assert not [p for p in root.rglob("*") if p.is_file()]  # nothing half-written

    only(download_mod.Source(target, url=f"{base}/bisenet.pth"))
    assert download_mod.download_models(root) == [root / target]
    assert (root / target).read_bytes() == (served / "bisenet.pth").read_bytes()
    assert download_mod.download_models(root) == []  # present and valid: nothing to do
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["79999_iter.pth"]


def test_face_parse_url_override_and_demo_guard(demo_models, monkeypatch):
    monkeypatch.setenv("MUSETALK_FACE_PARSE_URL", "https://mirror.example/79999_iter.pth")
    urls = {s.target: s.url for s in download_mod.sources(("v15", "v1"))}
    assert urls["face-parse-bisent/79999_iter.pth"] == "https://mirror.example/79999_iter.pth"
    assert "musetalk/pytorch_model.bin" in urls and "musetalkV15/unet.pth" in urls
    with pytest.raises(InputError, match="demo weights"):
        download_mod.download_models(demo_models)

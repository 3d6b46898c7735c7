"""Our UNet and VAE against diffusers, the independent reference: names, shapes, numbers, configs."""

import copy
import dataclasses
import inspect
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from musetalk_ops.errors import ModelFilesError
from musetalk_ops.models import load_models
from musetalk_ops.models.layers import GroupNorm, Timesteps, Upsample2D, group_norm_from_channel_moments
from musetalk_ops.models.layout import ModelLayout, read_json, read_state_dict
from musetalk_ops.models.unet import OFFICIAL_UNET_CONFIG, build_unet
from musetalk_ops.models.unet_model import UNetConfig
from musetalk_ops.models.vae import OFFICIAL_VAE_CONFIG, build_vae, encode_crops, load_vae
from musetalk_ops.models.vae_model import VAEConfig, rename_deprecated_attention

TOLERANCE = 1e-4  # max abs difference in fp32 on CPU (measured: 0, the same operations in the same order)

SMALL_UNET = {**OFFICIAL_UNET_CONFIG, "block_out_channels": [32, 64, 64, 64]}
# Every other implemented option off its MuseTalk value: 3 blocks, mixed block types, 4 heads, ...
ODD_UNET = {
    "in_channels": 5,
    "out_channels": 3,
    "block_out_channels": [32, 48, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "norm_eps": 1e-6,
    "cross_attention_dim": 24,
    "attention_head_dim": 4,
}
SMALL_VAE = {**OFFICIAL_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
ODD_VAE = {
    **OFFICIAL_VAE_CONFIG,
    "in_channels": 4,
    "out_channels": 2,
    "latent_channels": 3,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 8,
}


def diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def twins(config: dict, reference_cls, build) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The diffusers model with seeded random weights, and ours holding a copy of them."""
    torch.manual_seed(0)
    reference = reference_cls(**diffusers_kwargs(config)).eval()
    ours = build(config, "test")
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


# --- names and shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "reference_cls", "build"),
    [
        (OFFICIAL_UNET_CONFIG, UNet2DConditionModel, build_unet),
        (OFFICIAL_VAE_CONFIG, AutoencoderKL, build_vae),
    ],
)
def test_official_configs_have_diffusers_state_dict_keys_and_shapes(config, reference_cls, build):
    with torch.device("meta"):
        want = {k: v.shape for k, v in reference_cls(**diffusers_kwargs(config)).state_dict().items()}
        got = {k: v.shape for k, v in build(config, "official").state_dict().items()}
    assert sorted(set(want) ^ set(got)) == []
    assert got == want


@pytest.mark.parametrize(
    ("config", "reference_cls", "build"),
    [(SMALL_UNET, UNet2DConditionModel, build_unet), (SMALL_VAE, AutoencoderKL, build_vae)],
)
def test_seeded_initialisation_equals_diffusers(config, reference_cls, build):
    """Modules are built in diffusers' order, so demo weights are what diffusers would have drawn."""
    torch.manual_seed(5)
    want = reference_cls(**diffusers_kwargs(config)).state_dict()
    torch.manual_seed(5)
    got = build(config, "demo").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "size", "batch"), [(SMALL_UNET, (32, 32), 3), (ODD_UNET, (24, 16), 2)])
def test_unet_output_equals_diffusers(config, size, batch):
    reference, ours = twins(config, UNet2DConditionModel, build_unet)
    cfg = ours.config
    g = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, cfg.in_channels, *size, generator=g)
    tokens = torch.randn(batch, 50, cfg.cross_attention_dim, generator=g)
    timesteps = [torch.tensor([0]), torch.tensor(7), torch.arange(batch) * 400 + 3]  # [1], scalar, per sample
    with torch.no_grad():
        for t in timesteps:
            want = reference(sample, t, encoder_hidden_states=tokens).sample
            assert max_diff(ours(sample, t, tokens), want) <= TOLERANCE
    assert want.abs().max() > 0.1  # not a vacuous comparison


def test_unet_rejects_sizes_it_cannot_upsample_back():
    with torch.device("meta"):
        unet = build_unet(SMALL_UNET, "small")
        with pytest.raises(ValueError, match="multiples of 8"):
            unet(torch.zeros(1, 8, 36, 32), torch.zeros(1), torch.zeros(1, 50, 384))


@pytest.mark.parametrize(("config", "size", "batch"), [(SMALL_VAE, (64, 64), 2), (ODD_VAE, (24, 40), 3)])
def test_vae_encode_mean_and_decode_equal_diffusers(config, size, batch):
    reference, ours = twins(config, AutoencoderKL, build_vae)
    cfg = ours.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    g = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, cfg.in_channels, *size, generator=g) * 2 - 1
    latents = torch.randn(batch, cfg.latent_channels, size[0] // factor, size[1] // factor, generator=g)
    with torch.no_grad():
        assert max_diff(ours.encode_mean(images), reference.encode(images).latent_dist.mean) <= TOLERANCE
        assert max_diff(ours.decode(latents), reference.decode(latents).sample) <= TOLERANCE


def test_timestep_embedding_is_bit_identical_to_diffusers():
    t = torch.tensor([0, 1, 17, 999, 1000])
    for dim in (32, 320, 1280):
        want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.equal(Timesteps(dim)(t), want)


def test_device_and_dtype_follow_the_weights():
    unet, vae = build_unet(SMALL_UNET, "small"), build_vae(SMALL_VAE, "small")
    assert (unet.device, unet.dtype, vae.device, vae.dtype) == (torch.device("cpu"), torch.float32) * 2
    assert vae.to(torch.float64).dtype == torch.float64


# --- deprecated VAE attention names --------------------------------------------------------------------


def test_deprecated_vae_attention_names_are_renamed_as_diffusers_does():
    reference, ours = twins(SMALL_VAE, AutoencoderKL, build_vae)
    new_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in reference.state_dict().items():
        for new, old in new_names.items():
            key = key.replace(new, old) if ".mid_block.attentions." in key else key
        legacy[key] = value
    legacy["decoder.conv_in.query.weight"] = torch.zeros(1)  # not an attention: left alone
    assert sum(".query." in k for k in legacy) == 5  # weight and bias of 2 attentions, and the decoy

    want = reference._fix_state_dict_keys_on_load(dict(legacy))  # diffusers' own conversion
    got = rename_deprecated_attention(ours, legacy)
    assert got.keys() == want.keys()
    assert all(got[k] is want[k] for k in want)
    del got["decoder.conv_in.query.weight"]
    ours.load_state_dict(got, strict=True)


# --- configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_cls", "reference_cls"), [(UNetConfig, UNet2DConditionModel), (VAEConfig, AutoencoderKL)]
)
def test_configs_cover_the_diffusers_arguments_with_their_defaults(config_cls, reference_cls):
    signature = {
        name: param.default
        for name, param in inspect.signature(reference_cls.__init__).parameters.items()
        if name != "self"
    }
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
    assert sorted(signature) == sorted([*fields, *config_cls.DIFFUSERS_DEFAULTS])
    assert {**fields, **config_cls.DIFFUSERS_DEFAULTS} == signature


@pytest.mark.parametrize(
    ("config", "config_cls", "reference_cls"),
    [
        (OFFICIAL_UNET_CONFIG, UNetConfig, UNet2DConditionModel),
        (OFFICIAL_VAE_CONFIG, VAEConfig, AutoencoderKL),
    ],
)
def test_a_config_saved_by_diffusers_is_accepted(config, config_cls, reference_cls):
    """diffusers writes every argument; those at their defaults are what we implement."""
    with torch.device("meta"):
        saved = dict(reference_cls(**diffusers_kwargs(config)).config)
    assert len(saved) > len(config)
    assert config_cls.from_json(saved) == config_cls.from_json(config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_linear_projection": True}, r"use_linear_projection = True is not supported \(only False"),
        (
            {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
            "mid_block_type = 'UNetMidBlock2DSimpleCrossAttn'",
        ),
        ({"transformer_layers_per_block": 2}, "transformer_layers_per_block = 2"),
        ({"attention_head_dim": [5, 10, 20, 20]}, r"attention_head_dim = \(5, 10, 20, 20\) is not supported"),
        ({"down_block_types": ["AttnDownBlock2D"] * 4}, "down_block_types = .*AttnDownBlock2D"),
        ({"up_block_types": ["UpBlock2D"] * 3}, "up_block_types has 3 entries for 4 block_out_channels"),
        ({"colour": "blue"}, "unknown key 'colour'"),
    ],
)
def test_unet_config_outside_what_we_implement_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_json({**OFFICIAL_UNET_CONFIG, **change})
    with pytest.raises(ModelFilesError, match=r"musetalk\.json is not a supported UNet config: " + message):
        build_unet({**OFFICIAL_UNET_CONFIG, **change}, "musetalk.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scaling_factor": 0.13025}, "scaling_factor = 0.13025 is not supported"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention = False"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types has 3 entries"),
        ({"down_block_types": ["DownBlock2D"] * 4}, "down_block_types = .* is not supported"),
    ],
)
def test_vae_config_outside_what_we_implement_is_rejected(change, message):
    with pytest.raises(ModelFilesError, match=r"config\.json is not a supported VAE config: " + message):
        build_vae({**OFFICIAL_VAE_CONFIG, **change}, "config.json")


def test_defaults_and_bookkeeping_keys_are_ignored():
    config = {**OFFICIAL_UNET_CONFIG, "_name_or_path": "x", "dropout": 0.0, "num_attention_heads": None}
    assert UNetConfig.from_json(config) == UNetConfig.from_json(OFFICIAL_UNET_CONFIG)
    assert UNetConfig.from_json(config).attention_head_dim == 8


# --- cold start ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "aot"])
def test_a_render_step_imports_neither_diffusers_transformers_nor_opencv(
    mode, tmp_path, demo_models, astronaut_cache, features, aot_cache
):
    """Cold start: a render step (features come from the audio step) needs torch and PyAV only.
    diffusers and transformers each pull in torch._dynamo (seconds on a GPU node), OpenCV costs 0.3 s;
    an AOTInductor engine loads without Inductor. The step renders for real (the fast path as on a GPU
    but on the CPU), so imports made while rendering count too."""
    features.save(tmp_path / "features.safetensors")
    heavy = ("diffusers", "transformers", "torch._dynamo", "torch._inductor", "cv2")
    code = f"""
import sys
from pathlib import Path
from musetalk_ops.audio import AudioFeatures
from musetalk_ops.template_cache import load_template
from musetalk_ops.render.chunks import render_chunk
from musetalk_ops.render.models import load_render_models
from musetalk_ops.render.settings import RenderSettings
settings = RenderSettings(models_root=Path({str(demo_models)!r}), device="cpu", mode={mode!r}, batch_size=4)
template = load_template(Path({str(astronaut_cache)!r}))
models = load_render_models(settings, version=template.version, components=("unet", "vae"))
features = AudioFeatures.load(Path({str(tmp_path / "features.safetensors")!r}))
render_chunk(models, template, features, 0, 6, Path({str(tmp_path / "out.mp4")!r}), settings)
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""
    env = {**os.environ, "MUSETALK_CACHE": str(aot_cache)}  # aot: the engine is there, not built
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=300, capture_output=True, text=True, env=env
    )
    assert out.stdout.strip() == ""
    assert (tmp_path / "out.mp4").stat().st_size > 0


# --- group norm from channel moments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "groups", "offset"),
    [((2, 32, 8, 8), 8, 0.0), ((3, 20, 5, 7), 4, 0.0), ((2, 12, 6, 6), 12, 0.0), ((2, 16, 9), 2, 1e3)],
)
def test_group_norm_from_channel_moments_is_torchs(shape, groups, offset):
    """Channel moments pooled per group give torch's group norm (float64: only rounding differs), on
    channels-last input too, and stay exact when the mean dwarfs the spread (no E[x²] − E[x]²)."""
    torch.manual_seed(len(shape) + groups)
    weight, bias = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    # per-channel means differ within a group, so the pooled variance needs its between-channel term
    x = torch.randn(shape, dtype=torch.float64) + offset + torch.randn(shape[:2] + (1,) * (len(shape) - 2))
    want = torch.nn.functional.group_norm(x, groups, weight, bias, 1e-6)
    inputs = [x, x.to(memory_format=torch.channels_last)] if x.ndim == 4 else [x]
    for given in inputs:
        got = group_norm_from_channel_moments(given, groups, weight, bias, 1e-6)
        assert max_diff(got, want) <= 1e-9 * (1 + offset)


def test_group_norm_uses_channel_moments_only_when_compiled():
    """Exported (as an engine build traces it) the norm is per-channel moments, no fused group-norm op;
    run eagerly it is torch's own kernel, bit for bit."""
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        assert torch.equal(norm(x), torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6))
        ops = {str(n.target) for n in torch.export.export(norm, (x,)).graph.nodes if n.op == "call_function"}
    assert any("var_mean" in op for op in ops), ops
    assert not any("group_norm" in op for op in ops), ops


# --- folded upsampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "size"), [(4, (5, 7)), (16, (8, 8)), (3, (1, 1))])
def test_folded_upsample_is_the_same_function(channels, size):
    """Four 2×2 phase convolutions equal nearest ×2 + 3×3 conv (float64: only rounding differs)."""
    torch.manual_seed(channels)
    plain = Upsample2D(channels).double()
    folded = copy.deepcopy(plain)
    folded.fold()
    assert folded.conv is None and folded.phases.weight.shape == (4 * channels, channels, 2, 2)
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    with torch.no_grad():
        want, got = plain(x), folded(x)
    assert got.shape == (2, channels, 2 * size[0], 2 * size[1])
    assert max_diff(got, want) <= 1e-12 and want.abs().max() > 0.1


def test_engine_models_are_folded_and_compute_what_diffusers_does(demo_models):
    """``load_models`` folds every upsampler; its models still agree with diffusers' from the same files."""
    layout = ModelLayout(demo_models)
    models = load_models(demo_models, device="cpu", dtype=torch.float32, components=("unet", "vae"))
    vae, unet = models.vae, models.unet
    for model in (vae, unet):
        upsamplers = [m for m in model.modules() if isinstance(m, Upsample2D)]
        assert upsamplers and all(m.conv is None for m in upsamplers)
    reference_vae = AutoencoderKL.from_pretrained(layout.vae_dir).eval()
    reference_unet = UNet2DConditionModel(**diffusers_kwargs(read_json(layout.unet_config("v15")))).eval()
    reference_unet.load_state_dict(read_state_dict(layout.unet_weights("v15")))
    g = torch.Generator().manual_seed(0)
    latents, sample = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 8, 32, 32, generator=g)
    tokens, t = torch.randn(2, 50, 384, generator=g), torch.tensor([0])
    with torch.no_grad():
        assert max_diff(vae.decode(latents), reference_vae.decode(latents).sample) <= TOLERANCE
        want = reference_unet(sample, t, encoder_hidden_states=tokens).sample
        assert max_diff(unet(sample, t, tokens), want) <= TOLERANCE


# --- template latents against the official computation ---------------------------------------------


def official_latents(reference: AutoencoderKL, crop_bgr: np.ndarray) -> torch.Tensor:
    """Reference §3.1 with the posterior mean for one 256² BGR crop: the input built as the official
    ``preprocess_img`` builds it (float64 /255, a ``FloatTensor`` of the transposed array, half mask,
    Normalize 0.5/0.5, [1,3,256,256]), one encode per image; masked ‖ full → [1,8,32,32]."""
    x = np.transpose(np.asarray([cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB)]) / 255.0, (3, 0, 1, 2))
    x = torch.squeeze(torch.FloatTensor(x))
    mask = torch.zeros(256, 256)
    mask[:128] = 1
    halves = []
    with torch.no_grad():
        for image in (x * (mask > 0.5), x):
            official = ((image - torch.full((3, 1, 1), 0.5)) / torch.full((3, 1, 1), 0.5)).unsqueeze(0)
            # A permuted array's strides, but with a batch stride that rules out channels-last: torch
            # computes it as contiguous NCHW, bit for bit.
            latents = reference.encode(official).latent_dist.mean
            assert torch.equal(latents, reference.encode(official.contiguous()).latent_dist.mean)
            halves.append(latents * 0.18215)
    return torch.cat(halves, dim=1)


def test_template_latents_are_the_official_encode_bit_for_bit(
    tmp_path, astronaut_png, astronaut_rgb, demo_models
):
    """Issue #23: fp32 on the CPU, the preparation path's latents (a template prepared from the image
    with a manual box, and ``encode_crops`` of several crops at once) equal diffusers' ``AutoencoderKL``
    fed the official contiguous input, exactly; the masked crop's constant lower half is where a
    channels-last input drifted."""
    from musetalk_ops.prepare import face_crops, prepare_template
    from musetalk_ops.settings import TemplateSettings
    from musetalk_ops.template_cache import read_cache

    reference = AutoencoderKL.from_pretrained(ModelLayout(demo_models).vae_dir).eval()
    bgr = np.ascontiguousarray(astronaut_rgb[..., ::-1])  # what cv2.imread gives the official code

    template = read_cache(
        prepare_template(
            astronaut_png,
            tmp_path / "cache",
            template_id="astronaut",
            settings=TemplateSettings(face_box=[177, 66, 272, 175]),
            models_root=demo_models,
            device="cpu",
            dtype="float32",
        )
    )
    x1, y1, x2, y2 = template.faces[0].face_box
    assert (x1, y1, x2, y2) == (177, 66, 272, 185)  # the box plus extra_margin 10
    crop = cv2.resize(bgr[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    assert torch.equal(template.latents, official_latents(reference, crop))

    boxes = [(177, 66, 272, 185), (150, 40, 300, 200), (190, 90, 250, 170)]
    got = encode_crops(load_vae(demo_models, "cpu", torch.float32), face_crops([astronaut_rgb] * 3, boxes))
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        crop = cv2.resize(bgr[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
        assert torch.equal(got[i : i + 1], official_latents(reference, crop)), boxes[i]

"""AOTInductor engines on the CPU: built by the CLI, found by spec, bound to any weights of the same
architecture, and rendering the reference path's frames."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import cli_engine_build, crash_python_children, limit_gpu_batch, png_frames

from musetalk_ops.engine.build import BUILD_CONFIG, build_engine, build_step
from musetalk_ops.engine.check import CHECK, check_step
from musetalk_ops.engine.compiler import ENGINE_CXX, compiler_libstdcxx, engine_compiler, loaded_libstdcxx
from musetalk_ops.engine.load import engine_for
from musetalk_ops.engine.runner import oom_count, run_step
from musetalk_ops.engine.spec import engine_specs, find_engine_for, find_step, step_spec, unet_batches
from musetalk_ops.engine.steps import engine_steps
from musetalk_ops.errors import EngineError
from musetalk_ops.generator import FaceGenerator, StageClock
from musetalk_ops.models import load_models
from musetalk_ops.models import vae as vae_module
from musetalk_ops.models.demo import write_demo_models
from musetalk_ops.models.vae import decode_latents, decode_sliced, decode_slices
from musetalk_ops.render.chunks import render_chunk, resolve_mode
from musetalk_ops.render.fast import cached_generator
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.template_cache import load_template

BATCH = 4  # the aot_cache fixture's engine


def cpu_models(root):
    return load_models(root, device="cpu", dtype=torch.float32, components=("unet", "vae"))


def faces_of(models, mode: str, latents, tokens, engines=None) -> torch.Tensor:
    generator = FaceGenerator(models.unet, models.vae, mode=mode, max_batch=BATCH, engines=engines)
    return generator(latents, tokens, StageClock(models.device)).clone()


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 32, 32, generator=g), torch.randn(n, 50, 384, generator=g)


def level_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


def test_the_cli_builds_a_complete_engine_once(aot_cache, demo_models):
    models = cpu_models(demo_models)
    engines = aot_cache / "engines"
    found = find_engine_for(models.unet, models.vae, BATCH, engines)
    assert found is not None and list(found) == ["unet-b4", "vae-b4"]  # one decode slice: no tail UNet
    for name, path in found.items():
        step = name.split("-")[0]
        assert sorted(p.name for p in path.iterdir()) == ["engine.json", f"{step}.pt2"]
        manifest = json.loads((path / "engine.json").read_text())
        assert manifest["spec"]["step"] == step and manifest["spec"]["batch"] == BATCH
        assert manifest["spec"]["device"] == "cpu"
        assert manifest["cxx"] == engine_compiler() == shutil.which("g++")
    # Nothing else, no staging directory left.
    assert sorted(p.name for p in engines.iterdir()) == sorted(p.name for p in found.values())
    # A second build finds both: nothing is compiled or rewritten.
    before = {name: (path / "engine.json").stat().st_mtime_ns for name, path in found.items()}
    assert build_engine(models.unet, models.vae, BATCH, root=engines) == found
    assert {name: (path / "engine.json").stat().st_mtime_ns for name, path in found.items()} == before


def test_larger_batches_decode_in_equal_slices():
    assert [decode_slices(n) for n in (1, 20, 32, 33, 48, 64, 65, 96)] == [
        (1, 1),
        (1, 20),
        (1, 32),
        (2, 17),
        (2, 24),
        (2, 32),
        (3, 22),
        (3, 32),
    ]


def test_an_engine_for_a_larger_batch_shares_the_decode_and_runs_a_short_tail_on_a_slice(
    aot_cache, demo_models, tmp_path, monkeypatch
):
    """With decodes of at most 2 frames (as 32 on a GPU), an engine for BATCH has a UNet at BATCH and at
    2 and one VAE decode at 2 (the UNet at BATCH is the package already built for BATCH): a batch of 3
    runs the UNet of 4 and two decodes (the last padded), a batch of 1 the UNet of 2 and one decode, even
    after the bucket of 4 was used; the faces are the eager ones."""
    models = cpu_models(demo_models)
    before = find_engine_for(models.unet, models.vae, BATCH, aot_cache / "engines")
    shutil.copytree(aot_cache / "engines", tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(vae_module, "DECODE_BATCH", 2)
    assert unet_batches(BATCH) == (2, 4)
    generator = FaceGenerator(models.unet, models.vae, mode="aot", max_batch=BATCH, engines=tmp_path)
    paths = find_engine_for(models.unet, models.vae, BATCH, tmp_path)
    assert list(paths) == ["unet-b2", "unet-b4", "vae-b2"] and generator.buckets == (2, 4)
    assert paths["unet-b4"].name == before["unet-b4"].name and paths["vae-b2"].name != before["vae-b4"].name
    assert {step_spec(path).batch for path in paths.values()} == {2, 4}
    for n, bucket in ((3, 4), (1, 2)):
        latents, tokens = inputs(n, seed=n)
        assert generator.bucket(n) == bucket
        got = generator(latents, tokens, StageClock(models.device)).clone()
        want = faces_of(models, "eager", latents, tokens)
        assert got.shape == want.shape == (n, 256, 256, 3)
        diff = level_diff(got, want)
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001


def test_an_engine_runs_only_the_batch_sizes_it_was_built_for(aot_cache, demo_models):
    models = cpu_models(demo_models)
    engine = engine_for(models.unet, models.vae, BATCH, root=aot_cache / "engines")
    assert engine.batches == (BATCH,)
    with pytest.raises(ValueError, match=r"the engine's UNet runs batches of \[4\], not 2"):
        engine.unet(*inputs(2))


@pytest.mark.slow
def test_a_sliced_decode_gives_the_whole_batch_decode(demo_models, monkeypatch):
    """Slices of 3 for 7 latents: three calls of one shape (the last padded), the faces of one call."""
    vae = cpu_models(demo_models).vae
    latents = torch.randn(7, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    shapes = []

    def decode(part):
        shapes.append(tuple(part.shape))
        return decode_latents(vae, part)

    monkeypatch.setattr(vae_module, "DECODE_BATCH", 3)
    got = decode_sliced(decode, latents)
    assert shapes == [(3, 4, 32, 32)] * 3
    assert level_diff(got, decode_latents(vae, latents)).max() <= 1 and got.shape == (7, 256, 256, 3)


def test_the_engine_generates_the_eager_faces(aot_cache, demo_models):
    """A partial batch (3 of 4) through the engine vs the eager models: float rounding only."""
    models = cpu_models(demo_models)
    latents, tokens = inputs(3)
    got = faces_of(models, "aot", latents, tokens, aot_cache / "engines")
    want = faces_of(models, "eager", latents, tokens)
    assert got.shape == want.shape == (3, 256, 256, 3)
    diff = level_diff(got, want)
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001


def test_the_engine_binds_other_weights_of_the_same_architecture(aot_cache, demo_models, tmp_path):
    """Weights are bound at load time, and constants Inductor derives from them are recomputed from the
    bound weights (runtime constant folding): built with seed 0, run with seed 1, it matches seed 1."""
    write_demo_models(tmp_path, seed=1)
    other = cpu_models(tmp_path)
    engines = aot_cache / "engines"
    assert find_engine_for(other.unet, other.vae, BATCH, engines) is not None  # same spec
    latents, tokens = inputs(BATCH, seed=1)
    got = faces_of(other, "aot", latents, tokens, engines)
    want = faces_of(other, "eager", latents, tokens)
    assert level_diff(got, want).max() <= 1
    built_with = faces_of(cpu_models(demo_models), "eager", latents, tokens)
    assert level_diff(built_with, want).float().mean() > 10  # the two weight sets differ visibly


def test_incomplete_or_foreign_engines_are_not_found(aot_cache, demo_models, tmp_path):
    models = cpu_models(demo_models)
    spec = engine_specs(models.unet, models.vae, BATCH)["vae-b4"]
    copy = tmp_path / spec.key
    shutil.copytree(find_step(spec, aot_cache / "engines"), copy)
    assert find_step(spec, tmp_path) == copy
    assert find_engine_for(models.unet, models.vae, BATCH, tmp_path) is None  # no UNet step
    assert find_step(engine_specs(models.unet, models.vae, 8)["vae-b8"], tmp_path) is None  # batch
    manifest = json.loads((copy / "engine.json").read_text())
    (copy / "engine.json").write_text(json.dumps({**manifest, "format": 0}))
    assert find_step(spec, tmp_path) is None  # another format
    (copy / "engine.json").write_text("{")
    assert find_step(spec, tmp_path) is None  # torn manifest
    (copy / "engine.json").unlink()
    assert find_step(spec, tmp_path) is None  # still being built


def test_render_chunk_through_the_engine_gives_the_reference_frames(
    aot_cache, render_models, features, astronaut_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("MUSETALK_CACHE", str(aot_cache))
    cached_generator.cache_clear()
    template = load_template(astronaut_cache)
    stop = min(features.num_frames(template.fps), 10)
    fast = RenderSettings(batch_size=BATCH, device="cpu", dtype="float32", mode="aot", encoders=2)
    ref = RenderSettings(batch_size=BATCH, device="cpu", dtype="float32", mode="reference")
    try:
        a = render_chunk(
            render_models, template, features, 0, stop, tmp_path / "a.mp4", fast, frames_dir=tmp_path / "a"
        )
    finally:
        cached_generator.cache_clear()
    render_chunk(
        render_models, template, features, 0, stop, tmp_path / "b.mp4", ref, frames_dir=tmp_path / "b"
    )
    got, want = png_frames(tmp_path / "a"), png_frames(tmp_path / "b")
    assert sorted(got) == sorted(want) and len(want) == stop
    for name in want:
        diff = np.abs(got[name].astype(int) - want[name].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name
    assert a.timings.unet > 0 and a.timings.vae_decode > 0 and a.timings.mode == "aot"
    # The default stays the reference path on the CPU, engine or not.
    assert resolve_mode(None, render_models, BATCH) == "reference"


def test_the_cuda_default_runs_an_engine_built_for_the_batch_size(
    aot_cache, demo_models, tmp_path, monkeypatch
):
    """resolve_mode's CUDA branch with the real engine lookup: models that report a CUDA device (no GPU
    in CI) but whose UNet and VAE are the CPU ones the ``aot_cache`` engine was built for."""
    models = cpu_models(demo_models)
    on_cuda = SimpleNamespace(device=torch.device("cuda"), unet=models.unet, vae=models.vae)
    monkeypatch.setenv("MUSETALK_CACHE", str(aot_cache))
    assert resolve_mode(None, on_cuda, BATCH) == "aot"
    assert resolve_mode(None, on_cuda, BATCH * 2) == "graphs"  # no engine for that batch size
    assert resolve_mode("eager", on_cuda, BATCH) == "eager"  # asked for by name
    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path))
    assert resolve_mode(None, on_cuda, BATCH) == "graphs"  # never built here: not built unasked
    assert not (tmp_path / "engines").exists()


def test_out_of_memory_inside_the_engine_halves_the_batch_off_the_engine(
    aot_cache, render_models, features, astronaut_cache, tmp_path, monkeypatch
):
    """An engine exists for one batch size: after an out-of-memory error an ``aot`` render retries at
    half the batch on the default path (here the CPU's reference), without building another engine."""
    monkeypatch.setenv("MUSETALK_CACHE", str(aot_cache))
    limit_gpu_batch(monkeypatch, BATCH // 2)
    before = sorted(p.name for p in (aot_cache / "engines").iterdir())
    template = load_template(astronaut_cache)
    settings = RenderSettings(batch_size=BATCH, device="cpu", dtype="float32", mode="aot", encoders=1)
    told: list[str] = []
    result = render_chunk(
        render_models, template, features, 0, 3, tmp_path / "a.mp4", settings, on_retry=told.append
    )
    assert told == [f"CUDA out of memory at batch size {BATCH}: retrying with {BATCH // 2}"]
    assert (result.timings.batch_size, result.timings.mode) == (BATCH // 2, "reference")
    assert sorted(p.name for p in (aot_cache / "engines").iterdir()) == before


def test_an_engine_step_reports_an_out_of_memory_error_as_one():
    """The AOTInductor runtime turns a CUDA out-of-memory error into a bare RuntimeError; ``run_step``
    raises OutOfMemoryError instead when the allocator counted one, and leaves other errors alone."""
    ooms = 0

    class Runner:
        def __init__(self, outcome: str) -> None:
            self.outcome = outcome

        def run(self, inputs):
            nonlocal ooms
            if self.outcome == "ok":
                return [inputs[0] + 1]
            ooms += self.outcome == "oom"
            raise RuntimeError("run_func_( container_handle_, ...) API call failed")

    assert run_step(Runner("ok"), [torch.zeros(2)], lambda: ooms).tolist() == [1.0, 1.0]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_step(Runner("oom"), [], lambda: ooms)
    with pytest.raises(RuntimeError, match="API call failed") as raised:
        run_step(Runner("fails"), [], lambda: ooms)
    assert not isinstance(raised.value, torch.cuda.OutOfMemoryError)
    assert oom_count(torch.device("cpu")) == 0


def test_engine_build_with_missing_weights_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "musetalk_ops.cli",
            "engine",
            "build",
            "--models",
            str(tmp_path),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("musetalk: error: ")


def test_engine_build_of_an_unknown_part_is_a_one_line_error(demo_models, tmp_path):
    proc = cli_engine_build(demo_models, tmp_path, "--part", "unet-b8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "musetalk: error: an engine for batch 4 has no part 'unet-b8': unet-b4, vae-b4"
    )
    assert not (tmp_path / "engines").exists()


def test_an_engine_whose_runtime_crashes_is_refused(aot_cache, demo_models, tmp_path, monkeypatch):
    """The fresh-process check that gates publishing: it passes on a good engine, and a crashing
    AOTInductor runtime (simulated: the check process dies of SIGSEGV, as engines built with the lent GPU
    image's own ``$CXX`` do there) is a one-line EngineError naming the signal."""
    models = cpu_models(demo_models)
    spec = engine_specs(models.unet, models.vae, BATCH)["unet-b4"]
    step = engine_steps(models.unet, models.vae)["unet"]
    copy = shutil.copytree(find_step(spec, aot_cache / "engines"), tmp_path / "engine")
    check_step(copy, spec, step, models.device)
    crash_python_children(monkeypatch)
    with pytest.raises(
        EngineError, match="does not load and run in a fresh process \\(crashed with SIGSEGV\\)"
    ):
        check_step(copy, spec, step, models.device)
    assert not (copy / CHECK).exists()


@pytest.mark.parametrize("autotune", [False, True])
def test_a_build_asks_inductor_for_tuned_kernels_only_when_told(demo_models, tmp_path, monkeypatch, autotune):
    """What reaches Inductor per step: weights left out and refolded at load always; the VAE's kernels
    tuned by coordinate descent always; max-autotune, and coordinate descent for the UNet, with
    ``autotune`` only. A failing compile leaves no engine behind."""
    import torch._inductor

    seen = {}

    def compile_and_package(exported, package_path, inductor_configs):
        seen[Path(package_path).stem] = inductor_configs
        Path(package_path).write_bytes(b"")
        raise RuntimeError("compiler stopped here")

    monkeypatch.setattr(torch.export, "export", lambda step, inputs: step)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    models = cpu_models(demo_models)
    steps = engine_steps(models.unet, models.vae)
    for spec in engine_specs(models.unet, models.vae, BATCH, autotune=autotune).values():
        with pytest.raises(RuntimeError, match="compiler stopped here"):
            build_step(spec, steps[spec.step], models.device, root=tmp_path)
    assert set(seen) == {"unet", "vae"}
    for configs in seen.values():
        assert BUILD_CONFIG.items() <= configs.items()
        assert configs.get("max_autotune", False) is autotune
    assert seen["unet"].get("coordinate_descent_tuning", False) is autotune
    assert seen["vae"]["coordinate_descent_tuning"] is True
    assert list(tmp_path.iterdir()) == []


def static_runtime_compiler(directory) -> str:
    """A C++ toolchain like the lent GPU image's ``$CXX``: no shared libstdc++ (GCC then answers
    ``-print-file-name`` with the bare name), so shared objects get a static copy of it."""
    path = directory / "static-g++"
    path.write_text(
        "#!/bin/sh\n"
        'case "$1" in -print-file-name=*) echo "${1#-print-file-name=}"; exit 0 ;; esac\n'
        'case " $* " in *" -shared "*) exec g++ "$@" -static-libstdc++ ;; esac\n'
        'exec g++ "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def test_engine_compiler_shares_the_process_cxx_runtime(tmp_path, monkeypatch):
    fake = static_runtime_compiler(tmp_path)
    loaded = loaded_libstdcxx()
    assert loaded is not None and loaded.name.startswith("libstdc++.so")  # torch maps it
    assert compiler_libstdcxx(shutil.which("g++")) == loaded
    assert compiler_libstdcxx(fake) is None
    assert compiler_libstdcxx(str(tmp_path / "missing")) is None
    monkeypatch.setenv("CXX", fake)
    assert engine_compiler() == shutil.which("g++")  # $CXX passed over
    monkeypatch.setenv(ENGINE_CXX, fake)
    assert engine_compiler() == fake  # the explicit choice is taken as given
    monkeypatch.delenv(ENGINE_CXX)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert engine_compiler() is None  # nothing suitable: Inductor's default, still checked


@pytest.mark.slow
def test_an_engine_linked_with_its_own_cxx_runtime_is_refused(demo_models, tmp_path):
    """The failure the lent GPU image showed, for real on the CPU: a wrapper with a static libstdc++
    does not load (SIGSEGV there, a failed container creation here); the build says so in one line and
    leaves no engine behind."""
    proc = cli_engine_build(  # one part is enough to show the refusal
        demo_models, tmp_path / "cache", "--part", "vae-b4", **{ENGINE_CXX: static_runtime_compiler(tmp_path)}
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("musetalk: error: the engine built for cpu does not load and run in a fresh")
    assert "(exit 1: " in last
    assert list((tmp_path / "cache" / "engines").iterdir()) == []

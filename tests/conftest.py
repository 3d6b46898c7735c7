"""Shared fixtures: a real face, real speech, demo weights in the official layout, a real S3 server."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_engine_build, free_port, start_group, stop_group, wait_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests never touch the user's local cache or object store (each xdist worker imports this module: a
# pair of directories per worker).
os.environ["MUSETALK_CACHE"] = tempfile.mkdtemp(prefix="musetalk-test-cache-")
os.environ["MUSETALK_STORE"] = tempfile.mkdtemp(prefix="musetalk-test-store-")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # An equal share of the cores per xdist worker for torch (imported later) and the processes tests
    # start: a thread per core in every worker would oversubscribe them.
    share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need the engine build of ``aot_cache`` (about a minute) are slow."""
    for item in items:
        if "aot_cache" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def instance(tmp_path):
    """A temporary Dagster instance (SQLite under the test's tmp_path) for in-process runs."""
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """512×512 RGB public-domain photo; the face lies around x 177–272, y 66–175."""
    from skimage import data

    return data.astronaut().copy()


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory, astronaut_rgb) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("faces") / "astronaut.png"
    Image.fromarray(astronaut_rgb).save(path)
    return path


def make_speech(path: Path, text: str, rate: int = 16000, channels: int = 1) -> Path:
    """Speak ``text`` with espeak-ng and convert it with sox (real speech, a few seconds)."""
    if not shutil.which("espeak-ng") or not shutil.which("sox"):
        pytest.fail("espeak-ng and sox are required (apt-get install espeak-ng sox)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", str(channels), "-b", "16", str(path)], check=True)
    raw.unlink()
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """About 1.5 s of English speech, 16 kHz mono WAV."""
    return make_speech(tmp_path_factory.mktemp("audio") / "speech.wav", "Hello, this is a test.")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """A seeded random-weight model set in the official directory layout."""
    from musetalk_ops.models.demo import write_demo_models

    root = tmp_path_factory.mktemp("models")
    write_demo_models(root)
    return root


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real moto S3 server on 127.0.0.1 (HTTP, boto3's normal code path); yields its URL."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the moto server, with the environment a user would set."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# The astronaut's landmark box before extra margin (x from the jaw, y2 at the chin): skips dlib.
ASTRONAUT_FACE_BOX = (177, 66, 272, 175)


@pytest.fixture(scope="session")
def astronaut_cache(tmp_path_factory, astronaut_png, demo_models) -> Path:
    """A template cache of the astronaut image prepared with demo weights and a manual face box."""
    from musetalk_ops.prepare import prepare_template
    from musetalk_ops.settings import TemplateSettings

    out = tmp_path_factory.mktemp("caches") / "astronaut"
    return prepare_template(
        astronaut_png,
        out,
        template_id="astronaut",
        settings=TemplateSettings(face_box=list(ASTRONAUT_FACE_BOX)),
        models_root=demo_models,
        device="cpu",
        dtype="float32",
    )


@pytest.fixture(scope="session")
def short_speech(tmp_path_factory, speech_wav) -> Path:
    """The first 0.6 s of real speech (15 frames at 25 fps): two chunks of the test configuration."""
    import soundfile

    samples, rate = soundfile.read(speech_wav, dtype="int16")
    path = tmp_path_factory.mktemp("short") / "speech.wav"
    soundfile.write(path, samples[: int(0.6 * rate)], rate)
    return path


@pytest.fixture(scope="session")
def render_models(demo_models):
    """Demo models on the CPU in float32, loaded once for every test that renders in-process."""
    from musetalk_ops.render.models import load_render_models
    from musetalk_ops.render.settings import RenderSettings

    return load_render_models(RenderSettings(device="cpu", dtype="float32", models_root=demo_models))


@pytest.fixture(scope="session")
def features(render_models, speech_wav):
    """Whisper features of ``speech_wav``."""
    from musetalk_ops.render.models import compute_features

    return compute_features(render_models, speech_wav)


@pytest.fixture(scope="session")
def aot_cache(tmp_path_factory, demo_models) -> Path:
    """A ``$MUSETALK_CACHE`` holding an AOTInductor engine for the demo models on the CPU (float32, batch
    4), built by ``musetalk engine build`` in its own process (about a minute on two cores).

    Under xdist the first worker that needs it builds it for the run (an engine is found by the models'
    architecture, not by their files) and every worker gets its own copy."""
    cache = tmp_path_factory.mktemp("aot-cache")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        cli_engine_build(demo_models, cache).check_returncode()
        return cache
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "aot-cache"  # the run's directory above the workers'
    with FileLock(f"{shared}.lock"):
        if not shared.is_dir():
            partial = shared.with_name("aot-cache.partial")
            shutil.rmtree(partial, ignore_errors=True)
            cli_engine_build(demo_models, partial).check_returncode()
            partial.rename(shared)
    shutil.copytree(shared, cache, dirs_exist_ok=True)
    return cache


@pytest.fixture
def moto_server(tmp_path):
    """A moto S3 server owned by this test (so that it can be paused), yielding (process, url)."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = start_group(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env, tmp_path / "moto.log"
    )
    url = f"http://127.0.0.1:{port}"
    wait_for("moto", lambda: urllib.request.urlopen(f"{url}/moto-api/", timeout=1), 30, tmp_path / "moto.log")
    yield proc, url
    os.killpg(proc.pid, signal.SIGCONT)
    stop_group(proc, signal.SIGTERM, 10)

"""Helpers shared by the tests: servers in their own process groups, polling, a cuttable TCP proxy,
the frames of an MP4 for exact comparisons, an app on uvicorn in a thread, a template published as
``template_cache`` leaves it, and injected faults (a GPU too small for a batch, child interpreters
that crash)."""

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CRASH_AT_START = Path(__file__).resolve().parent / "faults" / "crash_at_start"
BIN = Path(sys.executable).parent


def decoded_frames(path: Path) -> np.ndarray:
    """Every video frame of ``path`` as RGB uint8 [N, H, W, 3]."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restore_signals() -> None:
    """A server started from a background job inherits ignored SIGINT/SIGTERM: restore them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_group(argv: list[str], env: dict, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """A server in its own process group (docs/architecture.md §7.1), output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=restore_signals,
        )


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30) -> None:
    """Signal the group, wait, then SIGKILL whatever is left of it."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_for(what: str, check, timeout: float, log: Path | None = None, every: float = 0.5):
    """Poll ``check`` until it returns something truthy; fail with the server log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(every)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


@contextlib.contextmanager
def dagster_dev_server(env: dict, port: int, log: Path, cwd: Path, timeout: float = 120) -> Iterator[str]:
    """``dagster dev -w workspace.yaml`` (webserver + daemon + code server) in its own process group
    on ``port``, run in ``cwd`` (where it reads a ``.env``; never the checkout's, which a developer's
    ``make demo`` wrote); yields its URL once ``/server_info`` answers, SIGINTs the group at the end."""
    url = f"http://127.0.0.1:{port}"
    workspace = str(ROOT / "workspace.yaml")
    argv = [str(BIN / "dagster"), "dev", "-w", workspace, "-h", "127.0.0.1", "-p", str(port)]
    proc = start_group(argv, env, log, cwd=cwd)
    try:
        wait_for(
            "the webserver",
            lambda: urllib.request.urlopen(f"{url}/server_info", timeout=2).status == 200,
            timeout,
            log,
        )
        yield url
    finally:
        stop_group(proc)  # SIGINT: dagster dev shuts its webserver, daemon and code server down


def wait_for_template(client, template: str, log: Path) -> None:
    """Wait until ``template_sensor`` has materialized ``template``'s cache (seen through GraphQL)."""
    from pipelines.submit import TEMPLATE_QUERY

    wait_for(
        "template_sensor to prepare the template",
        lambda: client.query(TEMPLATE_QUERY, {"template": template})["assetOrError"].get(
            "assetMaterializations"
        ),
        240,
        log,
    )


class TcpProxy:
    """A loopback TCP proxy in front of a server; ``cut()`` resets every connection and refuses new
    ones (an endpoint that went away), ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (Linux)
            listener.close()
        for conn in conns:  # shutdown wakes the pipe threads; close alone would not release the socket
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def cli_engine_build(models: Path, cache: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """``musetalk engine build`` for the demo models on the CPU (float32, batch 4) in its own process,
    into ``$MUSETALK_CACHE=cache``; ``extra`` adds flags, ``env`` variables."""
    flags = ["--models", models, "--device", "cpu", "--dtype", "float32", "--batch-size", "4", *extra]
    return subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", "engine", "build", *map(str, flags)],
        env={**os.environ, "MUSETALK_CACHE": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def png_frames(directory: Path) -> dict[str, np.ndarray]:
    """``--frames-dir`` output: {file name: RGB frame}."""
    import cv2

    return {p.name: cv2.imread(str(p))[:, :, ::-1] for p in sorted(directory.glob("*.png"))}


def every_blend_triple() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (dst, src, mask) byte triple once (2**24 pixels as a 4096×4096 image) and Pillow's
    ``paste(src, mask=L)`` result, the reference for the blend arithmetic."""
    from PIL import Image

    p = np.arange(1 << 24, dtype=np.uint32).reshape(4096, 4096)
    dst_v, src_v, mask = (
        (p >> 16).astype(np.uint8),
        ((p >> 8) & 255).astype(np.uint8),
        (p & 255).astype(np.uint8),
    )
    dst = np.stack([dst_v, src_v, dst_v ^ src_v], axis=2)
    src = np.stack([src_v, dst_v, 255 - src_v], axis=2)
    expected = Image.fromarray(dst)
    expected.paste(Image.fromarray(src), (0, 0), Image.fromarray(mask, "L"))
    return dst, src, mask, np.array(expected)


def deployment_env(monkeypatch, tmp_path: Path, models: Path) -> Path:
    """What a deployment sets for the pipeline: demo weights, a private local cache, the local
    store under ``tmp_path`` (returned), two GPUs for chunk planning, nothing inherited."""
    monkeypatch.setenv("MUSETALK_MODELS", str(models))
    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MUSETALK_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MUSETALK_GPUS", "2")
    for name in ("MUSETALK_S3_BUCKET", "MUSETALK_S3_PREFIX", "DAGSTER_HOME", "MUSETALK_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "store"


def limit_gpu_batch(monkeypatch, limit: int) -> None:
    """Simulate a GPU whose memory holds batches of at most ``limit`` frames: a chunk rendered with a
    larger batch raises CUDA out-of-memory before any work, so ``render_chunk``'s fallback runs on the
    CPU too. Wraps whatever ``render.chunks._render_once`` is now (the real one, or a test's stand-in)."""
    import torch

    from musetalk_ops.render import chunks
    from musetalk_ops.render.settings import RenderSettings

    render_once = chunks._render_once

    def too_small(*args, **kwargs):
        settings = next(a for a in (*args, *kwargs.values()) if isinstance(a, RenderSettings))
        if settings.batch_size > limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: batch {settings.batch_size} > {limit}")
        return render_once(*args, **kwargs)

    monkeypatch.setattr(chunks, "_render_once", too_small)


def crash_python_children(monkeypatch) -> None:
    """Every Python interpreter started from now on (until the test ends) dies of SIGSEGV as it starts:
    ``faults/crash_at_start`` goes first on ``$PYTHONPATH``, so its ``sitecustomize`` runs."""
    path = [str(CRASH_AT_START), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


def post_reply(url: str, rid: str | None, audio: Path, template: str = "astronaut", **fields):
    """``POST /v1/renders`` as a multipart upload of ``audio`` (``rid`` None: the worker picks the id)."""
    import requests

    data = {"template": template, **({"id": rid} if rid else {}), **fields}
    with open(audio, "rb") as f:
        return requests.post(f"{url}/v1/renders", data=data, files={"audio": (audio.name, f)}, timeout=120)


def impatient_s3(monkeypatch, attempts: int) -> None:
    """Credentials for moto, and an S3 client that gives up on a hung endpoint after 1 s × ``attempts``."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_MAX_ATTEMPTS": str(attempts),
        "MUSETALK_S3_READ_TIMEOUT": "1",
    }.items():
        monkeypatch.setenv(name, value)


def worker_settings(models: Path):
    """How the worker tests render: CPU, float32, batch 8 (the warm-up renders one small batch)."""
    from musetalk_ops.render.settings import RenderSettings

    return RenderSettings(device="cpu", dtype="float32", models_root=models, batch_size=8)


def publish_template(store, cache: Path, tid: str = "astronaut"):
    """The cache in the store as ``template_cache`` leaves it: files, manifest, then the pointer."""
    from musetalk_ops.template_cache import read_cache
    from musetalk_ops.template_store import CacheRef, upload_cache, write_pointer

    template = read_cache(cache)
    ref = CacheRef(tid, template.fingerprint, template.weights)
    upload_cache(store, cache, ref.prefix)
    write_pointer(store, ref)
    return ref


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free port of 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

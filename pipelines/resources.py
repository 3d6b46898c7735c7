"""Resources injected into assets, ops and sensors by typed parameters.

Every field left empty falls back to the environment variables of design.md at use time, so the
webserver, the daemon, step processes and step pods all configure themselves the same way.
"""

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import dagster as dg

from musetalk_ops import DEFAULT_BATCH_SIZE
from musetalk_ops.config import store_dir
from musetalk_ops.errors import InputError
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.store import LocalStore, S3Store, Store
from pipelines.executors import executor_name

K8S_GPUS = 4  # one GPU node of the production cluster (design.md)


@lru_cache(maxsize=8)
def _s3_store(bucket: str, prefix: str, endpoint: str | None) -> S3Store:
    return S3Store(bucket, prefix, endpoint_url=endpoint)


class StoreResource(dg.ConfigurableResource):
    """The object store: S3 when a bucket is set (here or ``$MUSETALK_S3_BUCKET``), else the local
    folder (here or ``$MUSETALK_STORE``). One key layout on both (musetalk_ops.keys)."""

    root: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str | None = None
    endpoint_url: str | None = None

    def get(self) -> Store:
        """The store client (S3 clients are made once per configuration and process)."""
        bucket = self.s3_bucket or (None if self.root else os.environ.get("MUSETALK_S3_BUCKET"))
        if not bucket:
            return LocalStore(store_dir(self.root))
        prefix = self.s3_prefix if self.s3_prefix is not None else os.environ.get("MUSETALK_S3_PREFIX", "")
        return _s3_store(bucket, prefix, self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None)


class RenderResource(dg.ConfigurableResource):
    """How renders run here: weights, device, dtype, batch size and chunk planning."""

    models_dir: str | None = None  # None: $MUSETALK_MODELS, else ./models
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: float16 on CUDA, float32 on the CPU
    batch_size: int = DEFAULT_BATCH_SIZE
    mode: str | None = None  # None: aot where an engine exists, else graphs on CUDA; reference on the CPU
    encoders: int | None = None  # None: one H.264 encoder thread per 4 CPUs
    min_chunk_frames: int = 250
    gpus: int | None = None  # None: $MUSETALK_GPUS, else 4 on k8s, else the GPUs visible here (min 1)

    def render_settings(self, **overrides: object) -> RenderSettings:
        """Engine settings; ``overrides`` are a request's validated options."""
        fields = {
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            "mode": self.mode,
            "encoders": self.encoders,
            "models_root": Path(self.models_dir) if self.models_dir else None,
        }
        return RenderSettings(**{**fields, **overrides})

    def gpu_count(self) -> int:
        """GPUs the render job may use at once: the chunk count of a long clip."""
        if self.gpus is not None:
            return max(1, self.gpus)
        raw = os.environ.get("MUSETALK_GPUS")
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise InputError(f"$MUSETALK_GPUS={raw!r}: expected a positive integer")
            return int(raw)
        if executor_name() == "k8s":
            return K8S_GPUS
        import torch

        return max(1, torch.cuda.device_count())


class GpuSlots(dg.ConfigurableResource):
    """Pins a GPU step of the multiprocess executor to one free GPU before CUDA starts.

    Slot ``i`` is an exclusive ``flock`` on ``lock_dir/gpu<i>.lock`` held for the whole step, so
    concurrent step processes (of one run or of several) never share a GPU. With ``gpus = 0``
    (in-process, Kubernetes, CPU) it does nothing: there the process or pod already owns its device.
    """

    gpus: int = 0
    lock_dir: str = str(Path(tempfile.gettempdir()) / "musetalk-gpu-locks")
    poll_seconds: float = 0.5

    @contextmanager
    def slot(self, log: dg.DagsterLogManager | None = None) -> Iterator[int | None]:
        """Hold a free GPU slot (waiting for one) and expose only that GPU to this process."""
        if self.gpus <= 0:
            yield None
            return
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("GPU slot requested after CUDA started in this process: pinning impossible")
        Path(self.lock_dir).mkdir(parents=True, exist_ok=True)
        while True:
            for index in range(self.gpus):
                fd = os.open(Path(self.lock_dir) / f"gpu{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                previous = os.environ.get("CUDA_VISIBLE_DEVICES")
                os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
                if log is not None:
                    log.info(f"GPU slot {index}: CUDA_VISIBLE_DEVICES={index}")
                try:
                    yield index
                finally:
                    if previous is None:
                        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                    else:
                        os.environ["CUDA_VISIBLE_DEVICES"] = previous
                    os.close(fd)  # releases the lock
                return
            time.sleep(self.poll_seconds)


def io_manager(store: StoreResource) -> dg.ConfigurableIOManager:
    """Step outputs (small dicts of keys and ranges): on S3 beside the store when it is S3 (every step
    pod must read them), else files under ``$DAGSTER_HOME/storage`` or beside the local store."""
    client = store.get()
    if isinstance(client, S3Store):
        from dagster_aws.s3 import S3PickleIOManager, S3Resource

        return S3PickleIOManager(
            s3_resource=S3Resource(endpoint_url=client.endpoint),
            s3_bucket=client.bucket,
            s3_prefix=f"{client.prefix}dagster",
        )
    if os.environ.get("DAGSTER_HOME"):
        return dg.FilesystemIOManager()
    return dg.FilesystemIOManager(base_dir=str(Path(client.root).parent / "dagster"))


def default_resources() -> dict[str, object]:
    """The resources of the code location, from the environment."""
    store = StoreResource()
    render = RenderResource()
    import torch

    pinning = executor_name() == "multiprocess" and torch.cuda.device_count() > 0
    return {
        "store": store,
        "render": render,
        "gpu_slots": GpuSlots(gpus=render.gpu_count() if pinning else 0),
        "io_manager": io_manager(store),
    }

"""Resources injected into assets, ops and sensors by typed parameters.

Every field left empty falls back to the environment (docs/architecture.md §6) at use time, so the
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
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from musetalk_ops.config import store_dir
from musetalk_ops.errors import InputError
from musetalk_ops.options import OPTIONS
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.store import LocalStore, Store
from pipelines.executors import executor_name

if TYPE_CHECKING:
    from musetalk_ops.s3_store import S3Store

K8S_GPUS = 4  # one GPU node of the production cluster (docs/architecture.md §3)


@lru_cache(maxsize=8)
def _s3_store(bucket: str, prefix: str, endpoint: str | None) -> "S3Store":
    from musetalk_ops.s3_store import S3Store  # boto3 only where S3 is configured

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


def _option(name: str):
    """A resource field that takes the default and the description of render option ``name``."""
    option = OPTIONS[name]
    return Field(default=option.default, description=option.help)


class RenderResource(dg.ConfigurableResource):
    """How renders run here: weights, device, dtype, batch size and chunk planning."""

    models_dir: str | None = Field(default=None, description="weights directory (default: $MUSETALK_MODELS)")
    device: str | None = _option("device")
    dtype: str | None = _option("dtype")
    batch_size: int = _option("batch_size")
    mode: str | None = _option("mode")
    encoders: int | None = _option("encoders")
    min_chunk_frames: int = Field(default=250, description="shortest chunk worth a GPU of its own")
    gpus: int | None = Field(
        default=None, description="GPUs for chunk planning (default: $MUSETALK_GPUS, 4 on k8s, else detected)"
    )

    def render_settings(self, **overrides: object) -> RenderSettings:
        """Render settings; ``overrides`` are a request's validated options."""

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
    """Step outputs (small records of keys and ranges): on S3 beside the store when it is S3 (every step
    pod must read them), else files under ``$DAGSTER_HOME/storage`` or beside the local store."""
    client = store.get()
    if not isinstance(client, LocalStore):
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
    return {
        "store": store,
        "render": render,
        "gpu_slots": GpuSlots(gpus=_pinned_gpus(render)),
        "io_manager": io_manager(store),
    }


def _pinned_gpus(render: RenderResource) -> int:
    """GPU slots to pin steps to: only the multiprocess executor on a machine with GPUs pins."""
    if executor_name() != "multiprocess":
        return 0
    import torch  # counting GPUs needs it; the other executors never load it here

    return render.gpu_count() if torch.cuda.device_count() > 0 else 0

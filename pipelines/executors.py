"""Where steps run, chosen by ``$MUSETALK_EXECUTOR`` (docs/architecture.md §3).

* ``in_process`` (default): one process per run, so the models are loaded once per run.
* ``multiprocess``: one process per step on one box; every GPU step takes a GPU slot
  (``resources.GpuSlots``) and at most ``gpus`` GPU steps of a run run at once.
* ``k8s``: ``k8s_job_executor``, one pod per step; GPU steps carry ``GPU_OP_TAGS`` below.
"""

import os
from collections.abc import Callable

import dagster as dg

from musetalk_ops.errors import InputError

EXECUTORS = ("in_process", "multiprocess", "k8s")
GPU_TAG = "musetalk/gpu"

# Only op tags reach step pods (job-level dagster-k8s/config shapes the run worker only).
# The weights volume (k8s/weights.yaml): its models/ read-only at $MUSETALK_MODELS=/models, and a
# writable $MUSETALK_CACHE=/cache (template copies) with the volume's fp16 copies, file hashes and AOT
# engines (k8s/engine.yaml) laid over it read-only. ReadWriteOnce storage lives on the GPU node, so every
# step that reads weights runs there (k8s/README.md).
_WEIGHTS = "weights"
_WEIGHTS_VOLUMES = [
    {"name": _WEIGHTS, "persistent_volume_claim": {"claim_name": "musetalk-weights", "read_only": True}},
    {"name": "cache", "empty_dir": {"size_limit": "20Gi"}},
]
_WEIGHTS_MOUNTS = [
    {"name": _WEIGHTS, "mount_path": "/models", "sub_path": "models", "read_only": True},
    {"name": "cache", "mount_path": "/cache"},
    *(
        {"name": _WEIGHTS, "mount_path": f"/cache/{name}", "sub_path": f"cache/{name}", "read_only": True}
        for name in ("converted", "hashes.json", "engines")
    ),
]
_GPU_NODE = {
    "node_selector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}

# Steps that read weights without a GPU (audio_features: Whisper on the CPU). A pod without a GPU
# request may still see the GPU node's devices; CUDA_VISIBLE_DEVICES="" keeps it off them.
WEIGHTS_K8S_CONFIG = {
    "container_config": {
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
        "volume_mounts": _WEIGHTS_MOUNTS,
        "env": [{"name": "CUDA_VISIBLE_DEVICES", "value": ""}],
    },
    "pod_spec_config": {**_GPU_NODE, "volumes": _WEIGHTS_VOLUMES},
}
WEIGHTS_OP_TAGS = {"dagster-k8s/config": WEIGHTS_K8S_CONFIG}

GPU_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        },
        "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}, *_WEIGHTS_MOUNTS],
    },
    "pod_spec_config": {
        **_GPU_NODE,
        # PyTorch workers share tensors through /dev/shm, which is 64 MiB in a default pod.
        "volumes": [
            {"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}},
            *_WEIGHTS_VOLUMES,
        ],
    },
    "pod_template_spec_metadata": {"labels": {"musetalk/workload": "gpu"}},
}
GPU_OP_TAGS = {GPU_TAG: "1", "dagster-k8s/config": GPU_K8S_CONFIG}


def executor_name(name: str | None = None) -> str:
    """The configured executor name, validated."""
    name = name or os.environ.get("MUSETALK_EXECUTOR") or "in_process"
    if name not in EXECUTORS:
        raise InputError(f"$MUSETALK_EXECUTOR={name!r}: use one of {', '.join(EXECUTORS)}")
    return name


def select_executor(name: str | None = None, gpus: Callable[[], int] = lambda: 1) -> dg.ExecutorDefinition:
    """The executor for every job of the code location; ``gpus`` (which may import torch to count them)
    is called only for the multiprocess executor, which runs at most that many GPU steps at once."""
    name = executor_name(name)
    if name == "multiprocess":
        limits = [{"key": GPU_TAG, "value": "1", "limit": max(1, gpus())}]
        return dg.multiprocess_executor.configured({"tag_concurrency_limits": limits}, name="multiprocess")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # imported only where it is used (0.5 s)

        return k8s_job_executor
    return dg.in_process_executor

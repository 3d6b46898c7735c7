"""Where steps run, chosen by ``$MUSETALK_EXECUTOR`` (design.md, Execution).

* ``in_process`` (default): one process per run, so the models are loaded once per run.
* ``multiprocess``: one process per step on one box; every GPU step takes a GPU slot
  (``resources.GpuSlots``) and at most ``gpus`` GPU steps of a run run at once.
* ``k8s``: ``k8s_job_executor``, one pod per step; GPU steps carry ``GPU_OP_TAGS`` below.
"""

import os

import dagster as dg

from musetalk_ops.errors import InputError

EXECUTORS = ("in_process", "multiprocess", "k8s")
GPU_TAG = "musetalk/gpu"

# Only op tags reach step pods (job-level dagster-k8s/config shapes the run worker only).
GPU_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        },
        "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
    },
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        # PyTorch workers share tensors through /dev/shm, which is 64 MiB in a default pod.
        "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}}],
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


def select_executor(name: str | None = None, gpus: int = 1) -> dg.ExecutorDefinition:
    """The executor for every job of the code location."""
    name = executor_name(name)
    if name == "multiprocess":
        limits = [{"key": GPU_TAG, "value": "1", "limit": max(1, gpus)}]
        return dg.multiprocess_executor.configured({"tag_concurrency_limits": limits}, name="multiprocess")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # imported only where it is used (0.5 s)

        return k8s_job_executor
    return dg.in_process_executor

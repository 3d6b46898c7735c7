"""The code location loads, has the canonical names, picks executors from the environment, pins GPU
steps, and gives render_chunk a valid GPU pod on Kubernetes."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from musetalk_ops.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_have_the_canonical_names(monkeypatch):
    monkeypatch.delenv("MUSETALK_EXECUTOR", raising=False)
    from pipelines.definitions import build_defs

    defs = build_defs()
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert {a.to_user_string() for a in repo.asset_graph.get_all_asset_keys()} == {
        "template_cache",
        "welcome_video",
        "rendered_video",
    }
    assert {s.name for s in repo.sensor_defs} == {
        "template_sensor",
        "render_request_sensor",
        "direct_render_sensor",
    }
    job = defs.get_job_def("render_video")
    assert job.partitions_def.name == "render_requests"
    assert {n.name for n in job.nodes} == {
        "load_request",
        "audio_features",
        "plan_chunks",
        "render_chunk",
        "merge_video",
    }
    assert job.executor_def.name == "in_process"
    graph = repo.asset_graph
    assert graph.get(dg.AssetKey("rendered_video")).parent_keys == {dg.AssetKey("template_cache")}
    assert graph.get(dg.AssetKey("welcome_video")).parent_keys == {dg.AssetKey("template_cache")}
    for key in ("template_cache", "welcome_video"):
        assert graph.get(dg.AssetKey(key)).partitions_def.name == "templates"
    assert set(repo.get_top_level_resources()) >= {"store", "render", "gpu_slots", "io_manager"}


@pytest.mark.parametrize("name", ["multiprocess", "k8s"])
def test_definitions_load_with_each_executor(monkeypatch, name):
    from pipelines.definitions import build_defs

    monkeypatch.setenv("MUSETALK_EXECUTOR", name)
    defs = build_defs()
    assert defs.get_job_def("render_video").executor_def.name == name


def test_executor_from_environment(monkeypatch):
    from pipelines.executors import select_executor

    assert select_executor("in_process") is dg.in_process_executor
    multi = select_executor("multiprocess", gpus=lambda: 4)
    assert multi.name == "multiprocess"
    assert select_executor("k8s").name == "k8s"
    monkeypatch.setenv("MUSETALK_EXECUTOR", "kubernetes")
    with pytest.raises(InputError, match="MUSETALK_EXECUTOR='kubernetes'"):
        select_executor()


def test_gpu_count_from_environment(monkeypatch):
    from pipelines.resources import RenderResource

    monkeypatch.setenv("MUSETALK_GPUS", "3")
    assert RenderResource().gpu_count() == 3
    assert RenderResource(gpus=2).gpu_count() == 2
    monkeypatch.delenv("MUSETALK_GPUS")
    monkeypatch.setenv("MUSETALK_EXECUTOR", "k8s")
    assert RenderResource().gpu_count() == 4
    monkeypatch.setenv("MUSETALK_GPUS", "two")
    with pytest.raises(InputError, match="MUSETALK_GPUS"):
        RenderResource().gpu_count()


def test_multiprocess_gpu_pinning_only_with_cuda(monkeypatch):
    """On this CPU machine the multiprocess executor must not pin (no CUDA), in-process never does."""
    from pipelines.resources import default_resources

    monkeypatch.setenv("MUSETALK_EXECUTOR", "multiprocess")
    monkeypatch.setenv("MUSETALK_GPUS", "4")
    import torch

    assert default_resources()["gpu_slots"].gpus == (4 if torch.cuda.device_count() else 0)


def test_gpu_slots_give_each_holder_its_own_device(tmp_path, monkeypatch):
    from pipelines.resources import GpuSlots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "outer")
    slots = GpuSlots(gpus=2, lock_dir=str(tmp_path), poll_seconds=0.05)
    got: list[int | None] = []

    def third() -> None:
        with slots.slot() as index:
            got.append(index)

    with slots.slot() as first:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == str(first) == "0"
        with slots.slot() as second:
            assert second == 1 and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
            waiter = threading.Thread(target=third)
            waiter.start()
            time.sleep(0.3)
            assert got == []  # both GPUs taken: the third step waits
        waiter.join(timeout=5)
        assert got == [1]  # ... and gets the GPU that was released
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "outer"
    with GpuSlots(gpus=0, lock_dir=str(tmp_path)).slot() as none:
        assert none is None and os.environ["CUDA_VISIBLE_DEVICES"] == "outer"


def test_render_chunk_runs_as_a_valid_gpu_pod_on_kubernetes():
    import kubernetes
    import kubernetes_validate
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from pipelines.jobs import load_request, merge_video, render_chunk

    assert render_chunk.pool == "gpu" and render_chunk.retry_policy.max_retries >= 1
    assert "dagster-k8s/config" not in load_request.tags and "dagster-k8s/config" not in merge_video.tags
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(
            job_image="registry.example/musetalk:1",
            dagster_home="/opt/dagster/dagster_home",
            instance_config_map="dagster-instance",
        ),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-render-chunk",
        user_defined_k8s_config=get_user_defined_k8s_config(render_chunk.tags),
        component="step_worker",
    )
    manifest = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    kubernetes_validate.validate(manifest, "1.31.0", strict=True)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


@pytest.mark.slow
def test_dagster_definitions_validate(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "MUSETALK_STORE": str(tmp_path / "store")}
    env.pop("MUSETALK_S3_BUCKET", None)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "musetalk" in done.stdout + done.stderr


@pytest.mark.parametrize("executor", ["in_process", "k8s"])
def test_code_location_imports_no_torch_and_no_opencv(executor):
    """The webserver, the daemon and every run worker import the code location: the engine's heavy
    libraries load only inside the steps that render."""
    heavy = "('torch', 'cv2', 'PIL')"
    probe = f"import sys, pipelines.definitions; print([m for m in {heavy} if m in sys.modules])"
    env = {**os.environ, "MUSETALK_EXECUTOR": executor}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_engine_package_never_imports_the_pipelines():
    """musetalk_ops is the engine: the orchestration package depends on it, never the reverse."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "musetalk_ops").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip().startswith(("import pipelines", "from pipelines", "import dagster", "from dagster"))
    ]
    assert offenders == []

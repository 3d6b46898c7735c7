"""The real ``k8s_job_executor`` renders a request against a fake Kubernetes API whose "pods" are local
processes running each Job's command and environment, with S3 on a moto server."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

from .deployment import (
    GPU,
    NAMESPACE,
    PG_SECRET,
    config_env,
    deployment_image,
    image_env,
    instance_settings,
    k8s_run_launcher,
    pod_spec,
    resources_of,
    validate,
    values,
)


class FakeKubernetes:
    """Stands in for the Kubernetes API the step handler talks to: records each Job and runs its pod as a
    local process with the Job's command and environment (envFrom resolved from ``objects``). Volume
    mounts are not emulated: paths come from the ConfigMap, pointed at local directories by the test."""

    def __init__(self, objects: dict[tuple[str, str], dict[str, str]], dagster_home: Path, logs: Path):
        self.objects, self.dagster_home, self.logs = objects, dagster_home, logs
        self.jobs: dict[str, dict] = {}
        self.namespaces: set[str] = set()
        self.processes: dict[str, subprocess.Popen] = {}

    def _env(self, container: dict) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.logs), "LANG": "C.UTF-8", **image_env()}
        for source in container.get("envFrom", []):
            kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else (
                "Secret", source["secretRef"])  # fmt: skip
            env.update(self.objects[(kind, ref["name"])])
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                secret = self.objects.get(("Secret", ref["name"]), {})
                if ref["key"] in secret:
                    env[var["name"]] = secret[ref["key"]]
                elif not ref.get("optional"):  # as the kubelet: a missing optional key leaves it unset
                    raise KeyError(f"Secret {ref['name']} has no key {ref['key']}")
        env["DAGSTER_HOME"] = str(self.dagster_home)  # the image's (empty) DAGSTER_HOME, here the instance's
        return env

    def create_job(self, body, namespace: str, **kwargs) -> None:
        from kubernetes.client import ApiClient

        job = ApiClient().sanitize_for_serialization(body)
        name = job["metadata"]["name"]
        (container,) = pod_spec(job)["containers"]
        command = [*container.get("command", []), *container["args"]]
        assert command[0] == "dagster"
        with (self.logs / f"{name}.log").open("w") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "dagster", *command[1:]],
                env=self._env(container),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.jobs[name] = job
        self.namespaces.add(namespace)

    def get_job_status(self, job_name: str, namespace: str, **kwargs):
        from kubernetes.client import V1JobStatus

        if job_name not in self.processes:
            return None
        code = self.processes[job_name].poll()
        if code is None:
            return V1JobStatus(active=1)
        return V1JobStatus(succeeded=1) if code == 0 else V1JobStatus(failed=1)

    def finish(self, timeout: float = 120) -> dict[str, int]:
        """Wait for every pod process (the executor stops polling once a step's events are in); kill
        stragglers. Returns the exit codes by Job name."""
        for process in self.processes.values():
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return {name: process.returncode for name, process in self.processes.items()}

    def step_key(self, job: dict) -> str:
        (container,) = pod_spec(job)["containers"]
        return next(v["value"] for v in container["env"] if v["name"] == "DAGSTER_RUN_STEP_KEY")


@pytest.mark.slow
def test_k8s_job_executor_renders_against_a_fake_cluster(
    tmp_path, monkeypatch, kubeconfig, demo_models, s3_bucket, s3_endpoint, astronaut_png, short_speech
):
    import boto3
    import dagster as dg
    import soundfile as sf
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster_k8s.client import DagsterKubernetesClient

    from musetalk_ops.store import open_store
    from musetalk_ops.video import probe
    from pipelines.assets import template_cache
    from pipelines.resources import default_resources

    vals = values()
    # The cluster's ConfigMap and Secrets, pointed at this machine's bucket, weights and cache.
    config = {
        **config_env(),
        "MUSETALK_S3_BUCKET": s3_bucket,
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "MUSETALK_MODELS": str(demo_models),
        "MUSETALK_CACHE": str(tmp_path / "cache"),
    }
    objects = {
        ("ConfigMap", "musetalk-config"): config,
        ("Secret", "musetalk-s3"): {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        ("Secret", PG_SECRET): {"postgresql-password": "unused-by-sqlite"},
    }
    for name, value in {**config, **objects[("Secret", "musetalk-s3")]}.items():
        monkeypatch.setenv(name, value)  # this process is the run worker pod
    for name in ("MUSETALK_S3_PREFIX", "MUSETALK_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "pipelines.definitions", raising=False)  # rebuilt with this env

    settings = instance_settings(vals)
    overrides = {
        "run_launcher": k8s_run_launcher(vals, kubeconfig),
        "compute_logs": settings["compute_logs"],
        "concurrency": {"pools": settings["concurrency"]["pools"]},
    }
    home = tmp_path / "dagster_home"
    home.mkdir()
    logs = tmp_path / "pods"
    logs.mkdir()
    fake = FakeKubernetes(objects, home, logs)
    monkeypatch.setattr(DagsterKubernetesClient, "create_namespaced_job_with_retries", fake.create_job)
    monkeypatch.setattr(DagsterKubernetesClient, "get_job_status", fake.get_job_status)

    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        # the template cache, prepared in this process (not under test here)
        store = open_store()
        store.put_file("templates/astro/source.png", astronaut_png)
        store.put_bytes("templates/astro/settings.yaml", b"face_box: [177, 66, 272, 175]\n")
        instance.add_dynamic_partitions("templates", ["astro"])
        assert dg.materialize(
            [template_cache], partition_key="astro", instance=instance, resources=default_resources()
        ).success
        store.put_file("audio/k8s-1.wav", short_speech)
        request = {"template": "astro", "audio": "audio/k8s-1.wav"}
        store.put_bytes("requests/k8s-1.json", json.dumps(request).encode())
        instance.add_dynamic_partitions("render_requests", ["k8s-1"])

        # No executor config, as in production: k8s_job_executor takes everything from the run launcher.
        min_chunk_frames = 8
        run_config = {"resources": {"render": {"config": {"min_chunk_frames": min_chunk_frames}}}}
        # what the code server hands out: the code location module, and the image it runs in
        location = ReconstructableRepository.for_module(
            "pipelines.definitions", "defs", str(ROOT), container_image=deployment_image(vals)
        )
        job = location.get_reconstructable_job("render_video")
        started = time.monotonic()
        try:
            with dg.execute_job(job, instance, run_config, tags={"dagster/partition": "k8s-1"}) as result:
                outcome = result.success
        finally:
            exit_codes = fake.finish()
        elapsed = time.monotonic() - started
    pod_logs = {p.name: p.read_text()[-2000:] for p in logs.glob("*.log")}
    assert outcome, f"run failed after {elapsed:.0f} s; pod logs: {json.dumps(pod_logs, indent=1)}"

    frames = sf.info(short_speech).frames * 25 // 16000
    chunks = min(int(config["MUSETALK_GPUS"]), math.ceil(frames / min_chunk_frames))
    steps = {fake.step_key(job): job for job in fake.jobs.values()}
    gpu_steps = {key for key, job in steps.items() if GPU in json.dumps(resources_of(job))}
    assert gpu_steps == {f"render_chunk[c{i:04d}]" for i in range(chunks)} and chunks == 2
    assert steps.keys() == gpu_steps | {"load_request", "audio_features", "plan_chunks", "merge_video"}
    assert fake.namespaces == {NAMESPACE}  # the release namespace, from the run launcher
    for key, job in steps.items():
        validate(job)
        assert exit_codes[job["metadata"]["name"]] == 0, key
    for key in gpu_steps:
        assert resources_of(steps[key])["limits"][GPU] == "1"

    out = tmp_path / "k8s-1.mp4"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.download_file(s3_bucket, "renders/k8s-1.mp4", str(out))
    info = probe(out)
    assert (info.frames, info.video_codec, info.audio_codec) == (frames, "h264", "aac")
    timings = json.loads(s3.get_object(Bucket=s3_bucket, Key="renders/k8s-1.json")["Body"].read())
    assert timings["chunks"] == chunks and timings["frames"] == frames
    # every step's stdout/stderr went to the bucket (computeLogManager in values.yaml)
    prefix = vals["computeLogManager"]["config"]["s3ComputeLogManager"]["prefix"]
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{prefix}/").get("KeyCount", 0)
    assert listed >= len(steps)

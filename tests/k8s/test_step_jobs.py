"""The step Jobs dagster-k8s builds for the real jobs (base = the run launcher the chart renders from
values.yaml, plus each op's ``dagster-k8s/config`` tag): GPU, node, volumes, and strictly valid."""

import json

import pytest

from .deployment import (
    DAGSTER_HOME,
    GPU,
    GPU_NODE_LABEL,
    GPU_STEPS,
    PG_SECRET,
    WEIGHT_STEPS,
    config_env,
    deployment_image,
    find,
    launcher_config,
    pod_spec,
    resources_of,
    validate,
    values,
)

RUN_ID = "0f1e2d3c-4b5a-4697-8877-665544332211"


@pytest.fixture
def pod_environment(monkeypatch):
    """The code location's environment in the cluster (musetalk-config), as the code server sees it."""
    for name, value in config_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def step_jobs(kubeconfig, pod_environment) -> dict[str, dict]:
    """The Job manifest of every step of render_video (two chunks) and of the template assets, built the
    way K8sStepHandler.launch_step builds them: run launcher context + op tag, construct_dagster_k8s_job."""
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.plan.state import KnownExecutionState
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job, get_k8s_job_name, get_user_defined_k8s_config
    from kubernetes.client import ApiClient

    from pipelines.definitions import build_defs

    vals = values()
    launcher = K8sRunLauncher(
        **{**launcher_config(vals), "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    )
    defs = build_defs()
    chunks = KnownExecutionState(dynamic_mappings={"plan_chunks": {"result": ["c0000", "c0001"]}})
    jobs = {}
    for job_def, known_state in [
        (defs.get_job_def("render_video"), chunks),
        (defs.resolve_implicit_global_asset_job_def(), None),
    ]:
        plan = create_execution_plan(job_def, known_state=known_state)
        run = DagsterRun(job_name=job_def.name, run_id=RUN_ID)
        base = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
        for step in plan.get_all_steps_in_topo_order():
            if step.key.endswith("[?]"):
                continue
            context = base.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
            job = construct_dagster_k8s_job(
                job_config=context.get_k8s_job_config(deployment_image(vals), launcher),
                args=["dagster", "api", "execute_step"],
                job_name=f"dagster-step-{get_k8s_job_name(RUN_ID, step.key)}",
                component="step_worker",
                user_defined_k8s_config=context.run_k8s_config,
                labels={"dagster/op": step.key, "dagster/run-id": RUN_ID},
                env_vars=[{"name": "DAGSTER_RUN_STEP_KEY", "value": step.key}],
            )
            jobs[step.key] = ApiClient().sanitize_for_serialization(job)
    assert jobs.keys() == {
        "load_request", "audio_features", "plan_chunks", "render_chunk[c0000]", "render_chunk[c0001]",
        "merge_video", "template_cache", "welcome_video",
    }  # fmt: skip
    return jobs


def op_name(step_key: str) -> str:
    return step_key.split("[")[0]


def test_every_step_job_validates_and_inherits_the_deployment_settings(step_jobs):
    from kubernetes.utils import parse_quantity

    vals = values()
    for key, job in step_jobs.items():
        validate(job)
        spec = pod_spec(job)
        (container,) = spec["containers"]
        assert container["image"] == deployment_image(vals) and spec["restartPolicy"] == "Never"
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert {"musetalk-config", "musetalk-s3"} <= refs, key
        pg = next(v for v in container["env"] if v["name"] == "DAGSTER_PG_PASSWORD")
        assert pg["valueFrom"]["secretKeyRef"]["name"] == PG_SECRET
        assert {"name": "DAGSTER_HOME", "value": DAGSTER_HOME} in container["env"]  # writable in the image
        signing = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"] if "C2PA" in v["name"]}
        assert signing == {  # content credentials from an optional Secret: without it, unsigned videos
            "MUSETALK_C2PA_CERT": {"name": "musetalk-c2pa", "key": "signer-chain.pem", "optional": True},
            "MUSETALK_C2PA_KEY": {"name": "musetalk-c2pa", "key": "signer-key.pem", "optional": True},
        }, key
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert job["spec"]["ttlSecondsAfterFinished"] == 3600
        resources = container["resources"]
        for name, limit in resources.get("limits", {}).items():  # merged tags must not contradict the base
            request = resources.get("requests", {}).get(name)
            assert request is None or parse_quantity(request) <= parse_quantity(limit), (key, name)


def test_gpu_steps_get_one_gpu_on_the_gpu_node_with_shm_and_read_only_weights(step_jobs):
    weights_job = pod_spec(find("Job", "musetalk-weights"))["containers"][0]
    job_mounts = {m["mountPath"]: m["subPath"] for m in weights_job["volumeMounts"]}
    env = config_env()
    models, cache = env["MUSETALK_MODELS"], env["MUSETALK_CACHE"]
    for key, job in step_jobs.items():
        spec = pod_spec(job)
        (container,) = spec["containers"]
        resources = resources_of(job)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        claims = {n for n, v in volumes.items() if "persistentVolumeClaim" in v}
        if op_name(key) in GPU_STEPS:
            assert resources["requests"][GPU] == resources["limits"][GPU] == "1", key
            shm = mounts["/dev/shm"]
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", key
        else:
            assert GPU not in json.dumps(resources), key
        if op_name(key) not in WEIGHT_STEPS:
            assert not claims and GPU_NODE_LABEL not in spec.get("nodeSelector", {}), key
            assert not any(t.get("key") == GPU for t in spec.get("tolerations", [])), key
            continue
        # the weights volume: read-only everywhere, on the node that holds it (ReadWriteOnce)
        assert spec.get("nodeSelector", {}).get(GPU_NODE_LABEL) == "true", key
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec.get("tolerations", []), key
        (claim,) = claims
        assert volumes[claim]["persistentVolumeClaim"] == {"claimName": "musetalk-weights", "readOnly": True}
        weight_mounts = [m for m in mounts.values() if m["name"] == claim]
        assert weight_mounts and all(m.get("readOnly") for m in weight_mounts), key
        assert mounts[models]["name"] == claim and mounts[models]["subPath"] == job_mounts[models], key
        # a writable MUSETALK_CACHE (template copies) with the Job's fp16 copies and hashes laid over it
        assert mounts[cache]["name"] != claim and not mounts[cache].get("readOnly"), key
        for name in ("converted", "hashes.json", "engines"):
            overlay = mounts[f"{cache}/{name}"]
            assert (overlay["name"], overlay["subPath"]) == (claim, f"{job_mounts[cache]}/{name}"), key
        if op_name(key) not in GPU_STEPS:  # on the GPU node without a GPU: keep CUDA off the node's GPUs
            assert {"name": "CUDA_VISIBLE_DEVICES", "value": ""} in container["env"], key

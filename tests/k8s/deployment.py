"""What k8s/ declares, read the way the Dagster chart and a cluster read it: manifests, Helm values, the
instance settings and run launcher the chart renders from them, and the Dockerfile's image."""

import os
from pathlib import Path

import yaml
from helpers import ROOT

K8S = ROOT / "k8s"
K8S_VERSIONS = ("1.31.0", "1.37.0")  # oldest still offered by managed services, newest in kubernetes-validate
RELEASE = "dagster"  # the Helm release name (k8s/README.md)
NAMESPACE = "musetalk"

# What the chart renders, transcribed from dagster-io/dagster helm/dagster at chart 1.13.x (the helm
# binary is not available here): instance ConfigMap name, Postgres secret, DAGSTER_HOME, service
# account (templates/helpers/instance/_run-launcher.tpl, _helpers.tpl).
INSTANCE_CONFIG_MAP = f"{RELEASE}-instance"
PG_SECRET = "dagster-postgresql-secret"
DAGSTER_HOME = "/opt/dagster/dagster_home"

# Which steps load weights and which need a GPU (docs/architecture.md §3: only render work runs on GPU
# pods; Whisper features are CPU work but read the weights volume).
GPU_STEPS = {"render_chunk", "template_cache", "welcome_video"}
WEIGHT_STEPS = GPU_STEPS | {"audio_features"}
GPU = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under k8s/ (values.yaml is Helm input, not a manifest)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "values.yaml")


def manifests() -> list[dict]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    (obj,) = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return obj


def values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def config_env() -> dict[str, str]:
    return find("ConfigMap", "musetalk-config")["data"]


def pod_spec(obj: dict) -> dict:
    """The pod spec of a workload (Job, Deployment, StatefulSet)."""
    return obj["spec"]["template"]["spec"]


def deployment_image(vals: dict) -> str:
    image = vals["dagster-user-deployments"]["deployments"][0]["image"]
    return f"{image['repository']}:{image['tag']}"


def webserver_service(vals: dict) -> str:
    """The webserver Service name the chart derives: <release>-<dagsterWebserver.nameOverride>."""
    return f"{RELEASE}-{vals['dagsterWebserver']['nameOverride']}"


def launcher_config(vals: dict) -> dict:
    """The K8sRunLauncher config the chart writes into dagster.yaml (helpers/instance/_run-launcher.tpl)."""
    k8s = vals["runLauncher"]["config"]["k8sRunLauncher"]
    run = k8s.get("runK8sConfig", {})
    snake = {
        "containerConfig": "container_config",
        "podSpecConfig": "pod_spec_config",
        "podTemplateSpecMetadata": "pod_template_spec_metadata",
        "jobSpecConfig": "job_spec_config",
        "jobMetadata": "job_metadata",
    }
    return {
        "load_incluster_config": k8s["loadInclusterConfig"],
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": RELEASE,
        "dagster_home": DAGSTER_HOME,
        "instance_config_map": INSTANCE_CONFIG_MAP,
        "postgres_password_secret": PG_SECRET,
        "env_config_maps": [ref["name"] for ref in k8s.get("envConfigMaps", [])],
        "env_secrets": [ref["name"] for ref in k8s.get("envSecrets", [])],
        "run_k8s_config": {snake[key]: value for key, value in run.items()},
    }


def k8s_run_launcher(vals: dict, kubeconfig: Path) -> dict:
    """The chart's ``run_launcher`` section, pointed at a kubeconfig instead of the in-cluster config."""
    config = {**launcher_config(vals), "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def instance_settings(vals: dict) -> dict:
    """The dagster.yaml sections the chart renders from ``concurrency``, ``computeLogManager`` and
    ``dagsterDaemon.{runMonitoring, runRetries}`` (templates/configmap-instance.yaml; the chart
    writes retry_on_asset_or_op_failure since dagster-io/dagster#24028)."""
    pools, runs = vals["concurrency"]["pools"], vals["concurrency"]["runs"]
    logs = vals["computeLogManager"]["config"]["s3ComputeLogManager"]
    monitoring, retries = vals["dagsterDaemon"]["runMonitoring"], vals["dagsterDaemon"]["runRetries"]
    return {
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
        },
        "run_retries": {
            "enabled": retries["enabled"],
            "max_retries": retries["maxRetries"],
            "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"],
        },
        "concurrency": {
            "pools": {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"]},
            "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"]},
        },
        "compute_logs": {
            "module": "dagster_aws.s3.compute_log_manager",
            "class": "S3ComputeLogManager",
            "config": {"bucket": logs["bucket"], "prefix": logs["prefix"]},
        },
    }


def validate(obj: dict) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (K8S / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_args() -> dict[str, str]:
    """The ARG defaults of the Dockerfile, as written."""
    return dict(arg.split("=", 1) for op, arg in dockerfile_instructions() if op == "ARG" and "=" in arg)


def image_env() -> dict[str, str]:
    """The ENV of the image (one NAME=value per ENV instruction; $PATH expanded against this machine)."""
    env = {}
    for op, arg in dockerfile_instructions():
        if op == "ENV":
            name, value = arg.split("=", 1)
            env[name] = value.replace("$PATH", os.environ["PATH"])
    return env


def resources_of(job: dict) -> dict:
    (container,) = pod_spec(job)["containers"]
    return container.get("resources", {})

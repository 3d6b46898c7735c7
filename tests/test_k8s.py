"""The Kubernetes deployment (k8s/), verified without a cluster, a Docker engine or helm.

* every manifest validates strictly against the Kubernetes API schemas, and the files refer to each
  other consistently (names, selectors, ports); the NetworkPolicies admit exactly the intended traffic;
* values.yaml uses only keys of the Dagster chart's values schema, and the settings the design needs;
* the Dockerfile and .dockerignore build the image the way the README says;
* the step Jobs dagster-k8s builds for the real jobs (base = the run launcher the chart renders from
  values.yaml, plus each op's ``dagster-k8s/config`` tag): GPU, node, volumes, and strictly valid;
* the real ``k8s_job_executor`` renders a request against a fake Kubernetes API whose "pods" are local
  processes running each Job's command and environment, with S3 on a moto server.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSIONS = ("1.31.0", "1.37.0")  # oldest still offered by managed services, newest in kubernetes-validate
RELEASE = "dagster"  # the Helm release name (k8s/README.md)
NAMESPACE = "musetalk"
RUN_ID = "0f1e2d3c-4b5a-4697-8877-665544332211"

# What the chart renders, transcribed from dagster-io/dagster helm/dagster at chart 1.13.x (the helm
# binary is not available here): instance ConfigMap name, Postgres secret, DAGSTER_HOME, service
# account (templates/helpers/instance/_run-launcher.tpl, _helpers.tpl).
INSTANCE_CONFIG_MAP = f"{RELEASE}-instance"
PG_SECRET = "dagster-postgresql-secret"
DAGSTER_HOME = "/opt/dagster/dagster_home"

# The keys of the chart's values schema (helm/dagster/schema/schema/charts/**, pydantic models) for the
# sections values.yaml sets. Sections not listed here are Kubernetes objects (resources, securityContext)
# validated below as part of the rendered Jobs.
CHART_KEYS = {
    "": {
        "dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
        "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
        "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox",
        "migrate", "telemetry", "serviceAccount", "global", "retention", "concurrency",
        "additionalInstanceConfig",
    },
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "dagster-user-deployments.deployments[]": {
        "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
        "deploymentNamespace", "port", "replicaCount", "env", "envConfigMaps", "envSecrets", "annotations",
        "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext", "resources",
        "livenessProbe", "readinessProbe", "startupProbe", "labels", "volumeMounts", "volumes",
        "schedulerName", "initContainers", "sidecarContainers", "deploymentStrategy",
    },
    "dagster-user-deployments.deployments[].image": {"repository", "tag", "pullPolicy"},
    "dagster-user-deployments.deployments[].includeConfigInLaunchedRuns": {"enabled"},
    "runLauncher": {"type", "config"},
    "runLauncher.config": {"celeryK8sRunLauncher", "k8sRunLauncher", "customRunLauncher"},
    "runLauncher.config.k8sRunLauncher": {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
        "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
        "schedulerName", "securityContext", "runK8sConfig",
    },
    "runLauncher.config.k8sRunLauncher.runK8sConfig": {
        "containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata",
    },
    "postgresql": {
        "postgresqlScheme", "image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
        "postgresqlDatabase", "postgresqlParams", "service",
    },
    "dagsterWebserver": {
        "dbStatementTimeout", "dbPoolRecycle", "logLevel", "schedulerName", "volumeMounts", "volumes",
        "pathPrefix", "replicaCount", "image", "nameOverride", "service", "workspace", "env", "envConfigMaps",
        "envSecrets", "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations",
        "podSecurityContext", "securityContext", "resources", "readinessProbe", "livenessProbe",
        "startupProbe", "annotations", "enableReadOnly",
    },
    "dagsterDaemon": {
        "enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps", "envSecrets",
        "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
        "securityContext", "resources", "checkDbReadyInitContainer", "livenessProbe", "readinessProbe",
        "startupProbe", "annotations", "runMonitoring", "runRetries", "sensors", "schedules", "backfills",
        "schedulerName", "logFormat", "volumeMounts", "volumes", "initContainerResources", "extraContainers",
        "extraPrependedInitContainers",
    },
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    "dagsterDaemon.runRetries": {"enabled", "maxRetries", "retryOnAssetOrOpFailure"},
    # a free-form dict in the schema; these are the keys templates/configmap-instance.yaml reads
    "dagsterDaemon.runMonitoring": {
        "enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "maxResumeRunAttempts",
        "pollIntervalSeconds", "freeSlotsAfterRunEndSeconds",
    },
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "computeLogManager": {"type", "config"},
    "computeLogManager.config": {
        "azureBlobComputeLogManager", "gcsComputeLogManager", "s3ComputeLogManager", "localComputeLogManager",
        "customComputeLogManager",
    },
    "computeLogManager.config.s3ComputeLogManager": {
        "bucket", "localDir", "prefix", "useSsl", "verify", "verifyCertPath", "endpointUrl", "skipEmptyFiles",
        "uploadInterval", "uploadExtraArgs", "showUrlOnly", "region",
    },
    "ingress": {"enabled"},
    "telemetry": {"enabled"},
}  # fmt: skip
ENUMS = {
    "runLauncher.type": {"CeleryK8sRunLauncher", "K8sRunLauncher", "CustomRunLauncher"},
    "dagsterDaemon.runCoordinator.type": {"QueuedRunCoordinator", "CustomRunCoordinator"},
    "computeLogManager.type": {
        "NoOpComputeLogManager", "AzureBlobComputeLogManager", "GCSComputeLogManager",
        "S3ComputeLogManager", "LocalComputeLogManager", "CustomComputeLogManager",
    },
    "concurrency.pools.granularity": {"run", "op"},
}  # fmt: skip

# Which steps load weights and which need a GPU (design.md: only render work runs on GPU pods; Whisper
# features are CPU work but read the weights volume).
GPU_STEPS = {"render_chunk", "template_cache", "welcome_video"}
WEIGHT_STEPS = GPU_STEPS | {"audio_features"}
GPU = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"


# --- reading k8s/ -----------------------------------------------------------------------------------


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


# --- manifests ----------------------------------------------------------------------------------------


def test_manifests_are_the_expected_set():
    kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests()}
    assert {
        ("ConfigMap", "musetalk-config"),
        ("Secret", "musetalk-s3"),
        ("Secret", "minio-root"),
        ("StatefulSet", "minio"),
        ("Service", "minio"),
        ("Service", "minio-hl"),
        ("Job", "minio-bucket"),
        ("PersistentVolumeClaim", "musetalk-weights"),
        ("Job", "musetalk-weights"),
        ("Job", "musetalk-engine"),
        ("NetworkPolicy", "default-deny-ingress"),
        ("Deployment", "oauth2-proxy"),
        ("Service", "oauth2-proxy"),
        ("Ingress", "dagster"),
    } <= kinds
    assert len(kinds) == len(manifests()), "two manifests share a kind and name"


def test_secrets_are_placeholders_kept_apart():
    """Only secrets.yaml holds Secrets (re-applying the other files never overwrites real credentials),
    and it holds no credential, only REPLACE-ME placeholders the bucket job refuses to run with."""
    for path in manifest_files():
        kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text()) if d}
        assert ("Secret" in kinds) == (path.name == "secrets.yaml"), path.name
    secrets = [d for d in yaml.safe_load_all((K8S / "secrets.yaml").read_text()) if d]
    for secret in secrets:
        for key, value in secret["stringData"].items():
            if key.endswith(("_SECRET", "_SECRET_KEY", "_PASSWORD")):
                assert value.startswith("REPLACE-ME"), (secret["metadata"]["name"], key)
    guard = pod_spec(find("Job", "minio-bucket"))["containers"][0]["args"][0]
    assert "*REPLACE-ME*) " in guard and "exit 1" in guard


@pytest.mark.parametrize(
    "doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}" if isinstance(d, dict) else ""
)
def test_manifest_validates_strictly(doc):
    validate(doc)


def test_validation_rejects_unknown_and_mistyped_fields():
    """The check above can fail: strict mode refuses an unknown field and a wrong type."""
    import kubernetes_validate

    job = find("Job", "musetalk-weights")
    typo = json.loads(json.dumps(job))
    pod_spec(typo)["containers"][0]["resource"] = {}  # "resources" misspelt
    mistyped = json.loads(json.dumps(job))
    mistyped["spec"]["backoffLimit"] = "two"
    for broken in (typo, mistyped):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_manifests_refer_to_each_other_consistently():
    docs = manifests()
    names = {(m["kind"], m["metadata"]["name"]) for m in docs}
    chart_made = {("Secret", PG_SECRET), ("Secret", "dagster-tls")}
    workloads = [m for m in docs if m["kind"] in ("Deployment", "StatefulSet", "Job")]
    for workload in workloads:
        spec = pod_spec(workload)
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                ref = ("ConfigMap", source["configMapRef"]["name"]) if "configMapRef" in source else None
                ref = ref or ("Secret", source["secretRef"]["name"])
                assert ref in names, f"{workload['metadata']['name']} reads missing {ref}"
            for var in container.get("env", []):
                key_ref = var.get("valueFrom", {}).get("configMapKeyRef")
                if key_ref and not key_ref.get("optional"):
                    assert key_ref["key"] in find("ConfigMap", key_ref["name"])["data"]
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    # every Service reaches a workload through its selector and named ports
    for service in (m for m in docs if m["kind"] == "Service"):
        targets = [
            w for w in workloads
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert targets, f"Service {service['metadata']['name']} selects no pod"
        ports = {p["name"] for c in pod_spec(targets[0])["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    minio = find("StatefulSet", "minio")
    assert find("Service", minio["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    ingress = find("Ingress", "dagster")
    (tls,) = ingress["spec"]["tls"]
    assert ("Secret", tls["secretName"]) in chart_made
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"]["name"] in {p["name"] for p in find("Service", backend["name"])["spec"]["ports"]}
    # oauth2-proxy forwards to the webserver Service the chart creates; in-cluster clients use the same
    vals = values()
    proxy_args = pod_spec(find("Deployment", "oauth2-proxy"))["containers"][0]["args"]
    assert f"--upstream=http://{webserver_service(vals)}:80/" in proxy_args
    assert config_env()["MUSETALK_DAGSTER_URL"] == f"http://{webserver_service(vals)}:80"
    # the S3 endpoint is the MinIO Service; the weights Job runs the code location's image
    assert config_env()["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert pod_spec(find("Job", "musetalk-weights"))["containers"][0]["image"] == deployment_image(vals)


def test_weights_job_fills_the_volume_the_steps_mount():
    job = find("Job", "musetalk-weights")
    spec = pod_spec(job)
    (container,) = spec["containers"]
    script = container["args"][0]
    *commands, last = [line.split() for line in script.strip().splitlines()]
    assert [c[:3] for c in commands] == [["musetalk", "models", c] for c in ("download", "convert", "check")]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "0"  # the image is offline; this Job is the one that downloads
    assert all(c[3:] == [env["MUSETALK_MODELS"]] for c in commands)
    # the engines directory the GPU steps mount exists even if the engine Job never runs
    assert last == ["mkdir", "-p", f"{env['MUSETALK_CACHE']}/engines"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[env["MUSETALK_MODELS"]]["subPath"] == "models"
    assert mounts[env["MUSETALK_CACHE"]]["subPath"] == "cache"  # fp16 copies land on the volume
    # the same paths as in the step pods (the hash memo is keyed by absolute path)
    assert (env["MUSETALK_MODELS"], env["MUSETALK_CACHE"]) == (
        config_env()["MUSETALK_MODELS"],
        config_env()["MUSETALK_CACHE"],
    )
    assert spec["nodeSelector"] == {GPU_NODE_LABEL: "true"}  # a ReadWriteOnce volume lives on that node
    assert GPU not in json.dumps(container["resources"])
    claim = find("PersistentVolumeClaim", "musetalk-weights")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_engine_job_builds_into_the_directory_the_gpu_steps_mount():
    """k8s/engine.yaml: ``musetalk engine build`` on one GPU of the GPU node, at the render steps' batch
    size, with the weights Job's volume layout, from the devel build of the deployment's image."""
    from pipelines.resources import RenderResource

    spec = pod_spec(find("Job", "musetalk-engine"))
    (container,) = spec["containers"]
    command = container["command"]
    assert command[:3] == ["musetalk", "engine", "build"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert int(flags["--batch-size"]) == RenderResource().batch_size  # else no render finds the engine
    env = {v["name"]: v["value"] for v in container["env"]}
    assert flags["--models"] == env["MUSETALK_MODELS"] == config_env()["MUSETALK_MODELS"]
    assert env["MUSETALK_CACHE"] == config_env()["MUSETALK_CACHE"]  # engines land in <cache>/engines
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    weights = pod_spec(find("Job", "musetalk-weights"))
    weights_mounts = {m["mountPath"]: m["subPath"] for m in weights["containers"][0]["volumeMounts"]}
    assert {path: m["subPath"] for path, m in mounts.items()} == weights_mounts
    assert mounts[env["MUSETALK_MODELS"]].get("readOnly") and not mounts[env["MUSETALK_CACHE"]].get(
        "readOnly"
    )
    assert spec["volumes"] == weights["volumes"]
    resources = container["resources"]
    assert resources["requests"][GPU] == resources["limits"][GPU] == "1"
    assert spec["nodeSelector"] == {GPU_NODE_LABEL: "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # the image: the documented devel build of the deployment's image (compiler, CUDA headers)
    assert container["image"] == deployment_image(values()) + "-engine"
    text = (K8S / "engine.yaml").read_text().replace("\\\n#", " ")
    build = re.search(r"docker build (.*)", text).group(1)
    assert f"-t {container['image']} ." in build
    base = re.search(r"BASE=(\S+)", build).group(1)
    assert base == dockerfile_args()["BASE"].replace(
        "-runtime-", "-devel-"
    )  # same CUDA and Ubuntu as the runtime
    assert 'BUILD_TOOLS="g++ python3.11-dev"' in build


# --- network policies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    labels: dict = field(hash=False)
    namespace: str = NAMESPACE


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "extend the matcher for matchExpressions"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Whether ``source`` may open TCP ``port`` on ``target`` under NetworkPolicy ingress rules."""
    applying = [
        p for p in policies
        if target.namespace == NAMESPACE and selects(p["spec"]["podSelector"], target.labels)
        and "Ingress" in p["spec"]["policyTypes"]
    ]  # fmt: skip
    if not applying:
        return True

    def peer_matches(peer: dict) -> bool:
        if "namespaceSelector" in peer:
            namespace_labels = {"kubernetes.io/metadata.name": source.namespace}
            return selects(peer["namespaceSelector"], namespace_labels) and selects(
                peer.get("podSelector", {}), source.labels
            )
        return source.namespace == NAMESPACE and selects(peer["podSelector"], source.labels)

    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            if "from" not in rule or any(peer_matches(peer) for peer in rule["from"]):
                return True
    return False


def test_network_policies_admit_exactly_the_intended_traffic():
    from dagster_k8s.utils import get_common_labels

    policies = [m for m in manifests() if m["kind"] == "NetworkPolicy"]
    release = {"app.kubernetes.io/instance": RELEASE}
    # pod labels as the chart's templates and dagster-k8s set them
    webserver = Pod({"app.kubernetes.io/name": "dagster", **release, "component": "dagster-webserver"})
    daemon = Pod({"app.kubernetes.io/name": "dagster", **release, "component": "dagster-daemon"})
    code_server = Pod(
        {"app.kubernetes.io/name": "dagster-user-deployments", **release, "component": "user-deployments"}
    )
    step = Pod({**get_common_labels(), "app.kubernetes.io/component": "step_worker"})
    postgres = Pod({"app": "postgresql", "release": RELEASE, "role": "master"})
    # pod labels from our manifests
    minio = Pod(find("StatefulSet", "minio")["spec"]["template"]["metadata"]["labels"])
    bucket_job = Pod(find("Job", "minio-bucket")["spec"]["template"]["metadata"]["labels"])
    proxy = Pod(find("Deployment", "oauth2-proxy")["spec"]["template"]["metadata"]["labels"])
    ingress_controller = Pod({"app.kubernetes.io/name": "ingress-nginx"}, namespace="ingress-nginx")
    api_client = Pod({"musetalk/dagster-api": "true"})
    stranger = Pod({"app": "something-else"})
    elsewhere = Pod({**release, "app.kubernetes.io/name": "dagster"}, namespace="other")

    allowed = [
        (ingress_controller, proxy, 4180),
        (proxy, webserver, 80),
        (api_client, webserver, 80),
        (webserver, code_server, 3030),
        (daemon, code_server, 3030),
        (webserver, postgres, 5432),
        (daemon, postgres, 5432),
        (step, postgres, 5432),
        (step, minio, 9000),
        (code_server, minio, 9000),
        (daemon, minio, 9000),
        (bucket_job, minio, 9000),
    ]
    denied = [
        (ingress_controller, webserver, 80),
        (stranger, webserver, 80),
        (step, webserver, 80),
        (stranger, proxy, 4180),
        (stranger, code_server, 3030),
        (stranger, postgres, 5432),
        (stranger, minio, 9000),
        (bucket_job, postgres, 5432),
        (elsewhere, minio, 9000),
        (elsewhere, postgres, 5432),
        (step, minio, 9001),  # the console stays closed
        (stranger, step, 8080),  # default deny covers everything else
    ]
    assert [(s, t, p) for s, t, p in allowed if not admits(policies, s, t, p)] == []
    assert [(s, t, p) for s, t, p in denied if admits(policies, s, t, p)] == []


# --- Helm values, Dockerfile ----------------------------------------------------------------------------


def test_values_use_only_chart_keys():
    vals = values()

    def walk(node, path: str):
        if path in CHART_KEYS:
            unknown = set(node) - CHART_KEYS[path]
            assert not unknown, f"{path or 'top level'}: not in the chart's values schema: {sorted(unknown)}"
            for key, child in node.items():
                walk(child, f"{path}.{key}" if path else key)
        elif isinstance(node, list) and f"{path}[]" in CHART_KEYS:
            for item in node:
                walk(item, f"{path}[]")

    walk(vals, "")
    for path, allowed in ENUMS.items():
        node = vals
        for part in path.split("."):
            node = node[part]
        assert node in allowed, f"{path}={node!r}"
    assert all(key in CHART_KEYS for key in vals), "a top-level section is not checked"


def test_values_configure_the_deployment_the_design_needs():
    vals, env = values(), config_env()
    (deployment,) = vals["dagster-user-deployments"]["deployments"]
    assert vals["dagster-user-deployments"]["enabled"] and deployment["name"] == "musetalk"  # = location name
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "pipelines.definitions"]
    assert vals["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = launcher_config(vals)
    assert launcher["load_incluster_config"] is True
    refs = {"musetalk-config", "musetalk-s3"}
    # code server, run/step pods, webserver and daemon (S3 compute logs) all get the store settings
    for section in (deployment, vals["runLauncher"]["config"]["k8sRunLauncher"], vals["dagsterWebserver"],
                    vals["dagsterDaemon"]):  # fmt: skip
        assert {r["name"] for r in section["envConfigMaps"] + section["envSecrets"]} == refs
    assert (env["MUSETALK_EXECUTOR"], env["MUSETALK_GPUS"]) == ("k8s", "4")
    assert {"MUSETALK_S3_BUCKET", "AWS_ENDPOINT_URL_S3"} <= env.keys()
    assert set(find("Secret", "musetalk-s3")["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert vals["postgresql"]["enabled"]
    daemon = vals["dagsterDaemon"]
    assert daemon["enabled"] and daemon["runMonitoring"]["enabled"] and daemon["runRetries"]["enabled"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert vals["concurrency"]["enabled"] and vals["concurrency"]["runs"]["maxConcurrentRuns"] > 0
    # the gpu pool: one slot per GPU, claimed per step
    assert vals["concurrency"]["pools"] == {"defaultLimit": int(env["MUSETALK_GPUS"]), "granularity": "op"}
    logs = instance_settings(vals)["compute_logs"]["config"]
    assert logs["bucket"] == {"env": "MUSETALK_S3_BUCKET"}
    assert not vals["ingress"]["enabled"]  # k8s/ingress.yaml puts authentication in front instead


def test_a_dead_run_worker_is_resumed_then_retried_from_failure(tmp_path, kubeconfig):
    """The rendered run monitoring and run retry settings load on the K8sRunLauncher (which can
    health-check and resume run workers: the instance refuses resume attempts otherwise) and start
    the daemons that act on them."""
    import dagster as dg

    vals = values()
    settings = instance_settings(vals)
    overrides = {
        "run_launcher": k8s_run_launcher(vals, kubeconfig),
        **{key: settings[key] for key in ("run_monitoring", "run_retries")},
    }
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        launcher = instance.run_launcher
        assert launcher.supports_check_run_worker_health and launcher.supports_resume_run
        assert instance.run_monitoring_max_resume_run_attempts == 1
        assert (
            0 < instance.run_monitoring_poll_interval_seconds < instance.run_monitoring_start_timeout_seconds
        )
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert instance.run_retries_max_retries > 0 and not instance.run_retries_retry_on_asset_or_op_failure
        assert {"MONITORING", "EVENT_LOG_CONSUMER"} <= set(instance.get_required_daemon_types())


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


def test_dockerfile_builds_the_documented_image():
    steps = dockerfile_instructions()
    ops = [op for op, _ in steps]
    arg_values = dockerfile_args()
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", arg_values["BASE"])
    assert steps[ops.index("FROM")] == ("FROM", "${BASE}")
    runs = [arg for op, arg in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '"$TORCH" --index-url "$TORCH_INDEX"' in r)
    project_step = next(i for i, r in enumerate(runs) if "-c /tmp/src/constraints.txt /tmp/src" in r)
    assert torch_step < project_step  # the CUDA torch satisfies torch>=2.4 before the project installs
    assert arg_values["TORCH"] == "torch==2.13.0"  # the version CI tests (CPU build there)
    assert arg_values["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert "espeak-ng" in runs[0]
    assert arg_values["BUILD_TOOLS"] == '""' and "${BUILD_TOOLS}" in runs[0]  # none in the runtime image
    user = next(arg for op, arg in steps if op == "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0  # numeric: runAsNonRoot can check
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    assert any(DAGSTER_HOME in r and "chown 1000:1000" in r for r in runs)  # the non-root user may write it
    assert image_env()["HF_HUB_OFFLINE"] == "1"
    sources = [s for op, arg in steps if op == "COPY" for s in arg.split()[:-1]]
    assert sources and not any(s.startswith(("models", ".", "tests")) for s in sources)  # no weights baked in
    assert not any("models download" in r for r in runs)


def test_image_keeps_compiled_bytecode():
    """Compiled bytecode is what keeps a step's cold start short: without it, every fresh process
    compiles torch's modules on import (1.7 → 2.7–3.6 s on an H200 host, bench/RESULTS.md session 6)."""
    from pipelines.executors import GPU_K8S_CONFIG, WEIGHTS_K8S_CONFIG

    runs = [arg for op, arg in dockerfile_instructions() if op == "RUN"]
    assert sum("pip install" in r for r in runs) >= 2 and not any("--no-compile" in r for r in runs)
    assert "PYTHONDONTWRITEBYTECODE" not in image_env()
    for config in (GPU_K8S_CONFIG, WEIGHTS_K8S_CONFIG):
        assert "PYTHONDONTWRITEBYTECODE" not in {e["name"] for e in config["container_config"].get("env", [])}


def dockerignored(path: str) -> bool:
    """.dockerignore semantics for top-level entries: the last matching pattern wins, ! re-includes."""
    import fnmatch

    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.removeprefix("!").rstrip("/")):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_build_inputs():
    sources = [s for op, arg in dockerfile_instructions() if op == "COPY" for s in arg.split()[:-1]]
    assert sources and not [s for s in sources if dockerignored(s)]
    assert "README.md" in sources  # pyproject's readme: the build fails without it
    for heavy in (".venv", ".git", "models", "tests", ".musetalk", ".pytest_cache", "k8s", "bench", "out"):
        assert dockerignored(heavy), heavy


def test_image_installs_the_postgres_storage_the_chart_configures():
    """Run and step pods load the chart's Postgres-backed instance, so dagster-postgres must be in the
    image, pinned like the rest of the Dagster family (the image installs the dependencies only)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    assert pins.get("dagster-postgres") == pins["dagster-k8s"], "add dagster-postgres to the dependencies"
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert f"dagster-postgres=={pins['dagster-k8s']}" in constraints
    assert any(line.startswith("psycopg2-binary==") for line in constraints)


# --- step Jobs from the real job definitions ---------------------------------------------------------


@pytest.fixture
def kubeconfig(tmp_path) -> Path:
    """A kubeconfig that parses but points nowhere: the code under test never reaches a cluster."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path


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


def resources_of(job: dict) -> dict:
    (container,) = pod_spec(job)["containers"]
    return container.get("resources", {})


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


# --- a full render through the real k8s_job_executor against a fake Kubernetes API -----------------------


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
                env[var["name"]] = self.objects[("Secret", ref["name"])][ref["key"]]
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


@pytest.fixture
def short_speech(tmp_path, speech_wav) -> Path:
    """The first 0.6 s of real speech: 15 frames at 25 fps."""
    import soundfile as sf

    samples, rate = sf.read(speech_wav, dtype="int16")
    path = tmp_path / "speech.wav"
    sf.write(path, samples[: int(0.6 * rate)], rate)
    return path


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

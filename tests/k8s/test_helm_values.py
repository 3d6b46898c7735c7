"""values.yaml uses only keys of the Dagster chart's values schema, sets what the design needs, and the
instance settings the chart renders from it load on the K8sRunLauncher."""

from .deployment import config_env, find, instance_settings, k8s_run_launcher, launcher_config, values

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

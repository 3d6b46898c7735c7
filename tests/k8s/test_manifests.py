"""Every manifest validates strictly against the Kubernetes API schemas, and the files refer to each
other consistently (names, selectors, ports); Secrets stay placeholders in a file of their own."""

import json

import pytest
import yaml

from .deployment import (
    K8S,
    K8S_VERSIONS,
    PG_SECRET,
    config_env,
    deployment_image,
    find,
    manifest_files,
    manifests,
    pod_spec,
    validate,
    values,
    webserver_service,
)


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

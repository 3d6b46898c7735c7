"""The NetworkPolicies admit exactly the intended traffic between the chart's pods, ours and strangers."""

from dataclasses import dataclass, field

from .deployment import NAMESPACE, RELEASE, find, manifests


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

"""The Jobs that fill the weights volume: k8s/weights.yaml (download, convert, check) and k8s/engine.yaml
(``musetalk engine build``), with the layout the GPU steps mount."""

import json
import re

from .deployment import (
    GPU,
    GPU_NODE_LABEL,
    K8S,
    config_env,
    deployment_image,
    dockerfile_args,
    find,
    pod_spec,
    values,
)


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

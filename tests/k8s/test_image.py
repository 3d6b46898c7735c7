"""The Dockerfile and .dockerignore build the image the way the README says."""

import re

from helpers import ROOT

from .deployment import DAGSTER_HOME, dockerfile_args, dockerfile_instructions, image_env


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
    compiles torch's modules on import (1.7 → 2.7–3.6 s on an H200 host, bench/RESULTS.md, 2026-12-03)."""
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

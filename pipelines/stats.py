"""``musetalk stats``: request counts, template usage and per-stage timings, from the Dagster instance
and the store. Keeps the fields of the service this replaces (totalRequests, completedRequests,
completionRate, pythonEngineStatus, templateUsage).

A request is a ``render_requests`` partition; its runs (retries, re-executions) are grouped by the
partition tag, so a request counts once whatever happened to it. A warm worker's direct render is
counted from the store (its record, failure record or claim), so it counts while Dagster is down too.
"""

import os
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np

from musetalk_ops import keys
from musetalk_ops.config import models_dir
from musetalk_ops.errors import InputError, ModelFilesError, MuseTalkError
from musetalk_ops.models.layout import check_models, weights_kind
from musetalk_ops.render_records import read_records, worker_records
from musetalk_ops.store import Store
from musetalk_ops.timings import STAGES
from pipelines.catalog import RENDERED_VIDEO
from pipelines.graphql import LOCATION, GraphQLClient
from pipelines.partitions import render_requests
from pipelines.request import TEMPLATE_TAG

RUNNING = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
}
WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95 with linear interpolation between samples (None without samples)."""
    if not values:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4)}


def weights_status(models: str | os.PathLike | None = None) -> dict:
    """Which weights a render would use here: official, demo, or missing (with the reason)."""
    root = models_dir(models)
    try:
        check_models(root)
    except ModelFilesError as e:
        return {"weights": "missing", "models": str(root), "detail": str(e)}
    return {"weights": weights_kind(root), "models": str(root.resolve())}


def code_location_status(client: GraphQLClient) -> str:
    """``loaded``, ``loading``, ``error: …``, ``not in workspace`` or ``webserver unreachable``."""
    try:
        data = client.query(WORKSPACE_QUERY)["workspaceOrError"]
    except MuseTalkError:
        return f"webserver unreachable at {client.url}"
    for entry in data.get("locationEntries", []):
        if entry["name"] == LOCATION:
            found = entry["locationOrLoadError"] or {}
            if found.get("__typename") == "PythonError":
                return f"error: {found['message'].strip().splitlines()[0]}"
            return "loaded" if entry["loadStatus"] == "LOADED" else entry["loadStatus"].lower()
    return "not in workspace"


def _latest_timings(instance: dg.DagsterInstance) -> list[dict]:
    """The timings of the newest rendered_video materialization of each request."""
    latest: dict[str, dict] = {}
    cursor = None
    while True:
        result = instance.fetch_materializations(RENDERED_VIDEO, limit=1000, cursor=cursor, ascending=True)
        for record in result.records:
            event = record.asset_materialization
            if event is not None and event.partition and "timings" in event.metadata:
                latest[event.partition] = event.metadata["timings"].value
        if not result.has_more:
            return list(latest.values())
        cursor = result.cursor


def _direct_renders(store: Store, run_ids: set[str]) -> dict[str, dict]:
    """``{request id: {"status": completed | failed | in progress, "template": ...}}`` of the renders of
    warm workers, from the store (their record, failure record or claim): they have no runs."""
    found: dict[str, dict] = {}
    for record in read_records(store, keys.FAILED):
        found[record.get("id", "")] = {"status": "failed", "template": record.get("template", "")}
    for record in worker_records(store, skip=run_ids):
        found[record["id"]] = {"status": "completed", "template": record.get("template", "")}
    for claim in read_records(store, keys.CLAIMS):
        rid = claim.get("id", "")
        if claim.get("by") == "worker" and rid not in found:
            found[rid] = {"status": "in progress", "template": claim.get("template", "")}
    found.pop("", None)
    return found


def _counts(total: int, completed: int, failed: int, running: int) -> dict:
    ratio = completed / total if total else 0.0
    return {
        "total": total,
        "completed": completed,
        "failed": failed,
        "inProgress": running,
        "completionRate": f"{ratio * 100:.2f}%",
    }


def collect_stats(
    instance: dg.DagsterInstance,
    store: Store,
    *,
    models: str | os.PathLike | None = None,
    client: GraphQLClient | None = None,
) -> dict:
    """Requests of both paths (Dagster runs and warm workers' direct renders), apart and together."""
    runs: dict[str, list[dg.DagsterRun]] = {}
    for record in instance.get_run_records(filters=dg.RunsFilter(job_name="render_video")):
        partition = record.dagster_run.tags.get("dagster/partition")
        if partition:
            runs.setdefault(partition, []).append(record.dagster_run)
    direct = _direct_renders(store, set(runs))
    requests = (set(instance.get_dynamic_partitions(render_requests.name)) | set(runs)) - set(direct)
    completed = {rid for rid, rs in runs.items() if any(r.status == dg.DagsterRunStatus.SUCCESS for r in rs)}
    running = {
        rid for rid, rs in runs.items() if rid not in completed and any(r.status in RUNNING for r in rs)
    }
    failed = set(runs) - completed - running
    usage = Counter(
        next((r.tags[TEMPLATE_TAG] for r in rs if r.tags.get(TEMPLATE_TAG)), "unknown")
        for rs in runs.values()
    )
    usage.update(d["template"] or "unknown" for d in direct.values())
    by_status = Counter(d["status"] for d in direct.values())
    paths = {
        "run": _counts(len(requests), len(completed), len(failed), len(running)),
        "worker": _counts(len(direct), by_status["completed"], by_status["failed"], by_status["in progress"]),
    }
    total = len(requests) + len(direct)
    done = len(completed) + by_status["completed"]
    rejected = [i for i in store.list(keys.REJECTED) if i.key.endswith(".json")]
    timings = _latest_timings(instance)
    ratio = done / total if total else 0.0
    weights = weights_status(models)
    location = code_location_status(client or GraphQLClient(timeout=3.0))
    return {
        "totalRequests": total,
        "completedRequests": done,
        "completionRate": f"{ratio * 100:.2f}%",
        "completionRatio": round(ratio, 4),
        "failedRequests": len(failed) + by_status["failed"],
        "inProgressRequests": len(running) + by_status["in progress"],
        "notStartedRequests": len(requests - set(runs)),
        "rejectedRequests": len(rejected),
        "paths": paths,
        "pythonEngineStatus": f"weights {weights['weights']}, code location {location}",  # the old service's
        "status": {**weights, "codeLocation": location},
        "templateUsage": dict(sorted(usage.items())),
        "renders": len(timings),
        "unsignedRenders": sum(not t.get("signer") for t in timings),  # without content credentials
        # the execution path per rendered video: on a GPU, whether renders found the AOT engine
        "renderModes": dict(sorted(Counter(t.get("mode") or "unknown" for t in timings).items())),
        "stages": {
            stage: percentiles([t[stage] for t in timings if stage in t]) for stage in (*STAGES, "total")
        },
        "fps": percentiles([t["fps"] for t in timings if "fps" in t]),
        "rtf": percentiles([t["rtf"] for t in timings if "rtf" in t]),
    }


def _seconds(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.2f}"


def format_stats(stats: dict) -> str:
    """The human-readable report."""
    lines = [
        f"requests   {stats['totalRequests']} total, {stats['completedRequests']} completed "
        f"({stats['completionRate']}), {stats['failedRequests']} failed, "
        f"{stats['inProgressRequests']} in progress, "
        f"{stats['notStartedRequests']} not started, {stats['rejectedRequests']} rejected",
        *(
            f"  {path:<9}{c['total']} total, {c['completed']} completed ({c['completionRate']}), "
            f"{c['failed']} failed, {c['inProgress']} in progress"
            for path, c in (("runs", stats["paths"]["run"]), ("workers", stats["paths"]["worker"]))
        ),
        f"status     {stats['pythonEngineStatus']}",
        "templates  "
        + (", ".join(f"{k}: {v}" for k, v in stats["templateUsage"].items()) or "none used yet"),
        "paths      " + (", ".join(f"{k}: {v}" for k, v in stats["renderModes"].items()) or "no renders yet"),
        f"signed     {stats['renders'] - stats['unsignedRenders']} of {stats['renders']} rendered videos",
        f"timings    over {stats['renders']} rendered videos (seconds)   p50     p95",
    ]
    for stage, p in stats["stages"].items():
        lines.append(f"  {stage:<15}{' ' * 31}{_seconds(p['p50'])}  {_seconds(p['p95'])}")
    for name in ("fps", "rtf"):
        p = stats[name]
        lines.append(f"  {name:<15}{' ' * 31}{_seconds(p['p50'])}  {_seconds(p['p95'])}")
    return "\n".join(lines)


def instance_from_env() -> dg.DagsterInstance:
    """The instance of ``$DAGSTER_HOME`` (the one ``dagster dev`` and the daemon use)."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise InputError(
            "DAGSTER_HOME is not set: run `make demo` here first (it records the local instance in .env), "
            "or export DAGSTER_HOME=<the directory of the Dagster instance that dagster dev uses>"
        )
    if not Path(home).is_dir():
        raise InputError(f"DAGSTER_HOME={home} is not a directory: the Dagster instance is not there")
    return dg.DagsterInstance.get()

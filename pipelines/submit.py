"""``musetalk submit``: one render request through the store and the Dagster GraphQL API.

The same sequence works from any client (POST ``{"query": ..., "variables": ...}`` as JSON to
``$MUSETALK_DAGSTER_URL/graphql``; the documents are the constants below):

1. ``TEMPLATE_QUERY`` with ``{"template": "<id>"}``: the template must have a ``template_cache``
   materialization (``assetMaterializations`` not empty).
2. Claim the id in the store: create ``claims/<request id>.json`` only if it does not exist (S3
   ``If-None-Match: *``), so no warm worker renders it too (``musetalk_ops.render_records``).
3. ``ADD_PARTITION`` with ``{"selector": {"repositoryLocationName": "musetalk", "repositoryName":
   "__repository__"}, "name": "render_requests", "key": "<request id>"}``. This reserves the id
   (``DuplicateDynamicPartitionError`` if it exists) *before* anything is uploaded, so
   ``render_request_sensor`` never starts a second run for it.
4. Upload ``audio/<request id>.<ext>``, then ``requests/<request id>.json`` =
   ``{"template": "<id>", "audio": "audio/<request id>.<ext>", "options": {}}``.
5. ``LAUNCH_RUN`` with ``{"params": {"selector": {"repositoryLocationName": "musetalk",
   "repositoryName": "__repository__", "jobName": "render_video"}, "runConfigData": {},
   "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "<request id>"},
   {"key": "musetalk/template", "value": "<id>"}]}}}`` → ``LaunchRunSuccess.run.runId``.
6. Poll ``RUN_QUERY`` with ``{"runId": ...}`` until ``status`` is SUCCESS, FAILURE or CANCELED;
   the video is ``renders/<request id>.mp4`` and its timings ``renders/<request id>.json``. A FAILURE
   tagged ``dagster/will_retry=true`` is not the end: the daemon re-executes the run from failure
   (run_retries, e.g. after its worker died) and tags it ``dagster/auto_retry_run_id=<new run>``;
   poll that run instead.

Without the API, uploading the audio and then the request object is enough: the sensor picks it up.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from musetalk_ops import keys
from musetalk_ops.audio import load_audio
from musetalk_ops.config import Limits
from musetalk_ops.errors import InputError
from musetalk_ops.ids import new_request_id, validate_id
from musetalk_ops.options import check_request_options
from musetalk_ops.render_records import claim_id
from musetalk_ops.store import Store
from pipelines.graphql import LOCATION, REPOSITORY, DagsterApiError, GraphQLClient
from pipelines.request import TEMPLATE_TAG, RenderRequest

JOB = "render_video"
TERMINAL = ("SUCCESS", "FAILURE", "CANCELED")
WILL_RETRY_TAG = "dagster/will_retry"  # set on a failed run when run_retries will re-execute it
RETRY_RUN_TAG = "dagster/auto_retry_run_id"  # then set to the id of the re-execution

TEMPLATE_QUERY = """
query TemplateCache($template: String!) {
  assetOrError(assetKey: {path: ["template_cache"]}) {
    __typename
    ... on Asset { assetMaterializations(partitions: [$template], limit: 1) { partition runId } }
  }
}"""

ADD_PARTITION = """
mutation AddRequest($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on DuplicateDynamicPartitionError { partitionName }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}"""

LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      status
      tags { key value }
      stats { ... on RunStatsSnapshot { enqueuedTime launchTime startTime endTime } }
      stepStats { stepKey status startTime endTime }
    }
    ... on Error { message }
  }
}"""

FAILURE_QUERY = """
query Failure($runId: ID!) {
  logsForRun(runId: $runId, limit: 1000) {
    ... on EventConnection {
      events { __typename ... on ExecutionStepFailureEvent { stepKey error { message } } }
    }
  }
}"""


@dataclass
class Submission:
    request_id: str
    run_id: str
    url: str
    submitted_at: float
    status: str = "QUEUED"
    result: dict = field(default_factory=dict)

    @property
    def video_key(self) -> str:
        return keys.render_video(self.request_id)


def _selector() -> dict:
    return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}


def submit(
    store: Store,
    template: str,
    audio: Path,
    *,
    request_id: str | None = None,
    options: dict | None = None,
    client: GraphQLClient | None = None,
    run_config: dict | None = None,
) -> Submission:
    """Validate locally, reserve the id, upload audio + request, launch ``render_video`` (with
    ``run_config``, e.g. engine resource settings, when given)."""
    started = time.time()
    template = validate_id(template, "template id")
    request_id = validate_id(request_id or new_request_id(), "request id")
    audio_key = keys.audio(request_id, Path(audio).suffix)
    load_audio(audio, Limits.from_env())  # readable, not silent, within limits: refuse it here, not in a run
    request = RenderRequest(request_id, template, audio_key, check_request_options(options or {}))
    client = client or GraphQLClient()

    found = client.query(TEMPLATE_QUERY, {"template": template})["assetOrError"]
    if found["__typename"] != "Asset" or not found["assetMaterializations"]:
        raise InputError(
            f"template {template!r} has no template_cache materialization: push it "
            "(musetalk templates push) and let template_sensor prepare it, or materialize it in the UI"
        )

    if not claim_id(store, request_id, "request", template=template):  # a worker may have rendered it
        raise InputError(f"request id {request_id!r} already exists: ids are never reused")
    added = client.query(
        ADD_PARTITION, {"selector": _selector(), "name": "render_requests", "key": request_id}
    )
    kind = added["addDynamicPartition"]["__typename"]
    if kind == "DuplicateDynamicPartitionError":
        raise InputError(f"request id {request_id!r} already exists: ids are never reused")
    if kind != "AddDynamicPartitionSuccess":
        raise DagsterApiError(
            f"could not add request {request_id}: {added['addDynamicPartition'].get('message', kind)}"
        )

    store.put_file(audio_key, audio)
    store.put_bytes(keys.request(request_id), request.to_json())

    params = {
        "selector": {**_selector(), "jobName": JOB},
        "runConfigData": run_config or {},
        "executionMetadata": {
            "tags": [
                {"key": "dagster/partition", "value": request_id},
                {"key": TEMPLATE_TAG, "value": template},
            ]
        },
    }
    launched = client.query(LAUNCH_RUN, {"params": params})["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        detail = launched.get("message") or "; ".join(e["message"] for e in launched.get("errors", []))
        raise DagsterApiError(f"could not launch {JOB} for {request_id}: {detail or launched['__typename']}")
    run_id = launched["run"]["runId"]
    return Submission(request_id, run_id, f"{client.url}/runs/{run_id}", started)


def _retry_of(client: GraphQLClient, run_id: str, run: dict) -> str | None:
    """The run that automatically re-executes failed run ``run_id``, once the daemon created it;
    ``run_id`` itself while that is still to come; None when the failure is final."""
    tags = {t["key"]: t["value"] for t in run.get("tags") or []}
    if WILL_RETRY_TAG not in tags:  # Dagster tags the run just after the failure event: look again
        time.sleep(1.0)
        again = client.query(RUN_QUERY, {"runId": run_id})["runOrError"]
        tags = {t["key"]: t["value"] for t in again.get("tags") or []}
    if tags.get(WILL_RETRY_TAG) != "true":
        return None
    return tags.get(RETRY_RUN_TAG) or run_id


def wait(
    submission: Submission, store: Store, client: GraphQLClient | None = None, timeout: float = 1800.0
) -> Submission:
    """Poll the run until it ends; on success ``result`` holds the timings and a latency breakdown.

    A run that failed and will be retried automatically (run_retries: its worker died) is followed
    to its retry: ``run_id`` and ``url`` then name the run that produced the video, ``result``
    lists the failed runs, and the latency is only the total (the stages spread over several runs).
    """
    client = client or GraphQLClient()
    deadline = time.monotonic() + timeout
    failed_runs: list[str] = []
    while True:
        run = client.query(RUN_QUERY, {"runId": submission.run_id})["runOrError"]
        if run["__typename"] != "Run":
            raise DagsterApiError(f"run {submission.run_id}: {run.get('message', run['__typename'])}")
        if run["status"] in TERMINAL:
            retry = _retry_of(client, submission.run_id, run) if run["status"] == "FAILURE" else None
            if retry is None:
                break
            if retry != submission.run_id:
                failed_runs.append(submission.run_id)
                submission.url = submission.url.replace(submission.run_id, retry)
                submission.run_id = retry
        if time.monotonic() > deadline:
            raise DagsterApiError(
                f"run {submission.run_id} still {run['status']} after {timeout:.0f} s: {submission.url}"
            )
        time.sleep(0.5)
    finished = time.time()
    submission.status = run["status"]
    if submission.status != "SUCCESS":
        submission.result = {"errors": _step_errors(client, submission.run_id)}
        if failed_runs:
            submission.result["failed_runs"] = failed_runs
        return submission
    timings = json.loads(store.get_bytes(keys.render_timings(submission.request_id)))
    if failed_runs:
        total = round(finished - submission.submitted_at, 3)
        submission.result = {"timings": timings, "latency": {"total": total}, "failed_runs": failed_runs}
        return submission
    submission.result = {
        "timings": timings,
        "latency": latency(submission.submitted_at, finished, run, timings),
    }
    return submission


def _step_errors(client: GraphQLClient, run_id: str) -> list[str]:
    logs = client.query(FAILURE_QUERY, {"runId": run_id})["logsForRun"]
    return [
        f"{e['stepKey']}: {e['error']['message'].strip()}"
        for e in logs.get("events", [])
        if e["__typename"] == "ExecutionStepFailureEvent"
    ]


def latency(submitted: float, finished: float, run: dict, timings: dict) -> dict:
    """Where the time went between submit and the MP4 in the store (seconds).

    submit: local validation, GraphQL calls and uploads; queue: run created → dequeued by the daemon;
    launch: dequeued → run worker started (process start + code load); model_load: engine and template
    loading inside the steps; render: first step start → last chunk end, minus model_load (features,
    chunk planning, UNet/VAE/composite/encode); merge: the merge step; overhead: the rest (step
    bookkeeping between steps, polling).
    """
    stats = run["stats"]
    steps = [s for s in run["stepStats"] if s["startTime"] and s["endTime"]]
    render_end = max(s["endTime"] for s in steps if s["stepKey"].startswith("render_chunk"))
    merge = [s["endTime"] - s["startTime"] for s in steps if s["stepKey"] == "merge_video"]
    launched = stats.get("launchTime") or stats["startTime"]
    parts = {
        "submit": stats["enqueuedTime"] - submitted if stats.get("enqueuedTime") else 0.0,
        "queue": launched - (stats.get("enqueuedTime") or submitted),
        "launch": stats["startTime"] - launched,
        "model_load": timings.get("load", 0.0),
        "render": render_end - min(s["startTime"] for s in steps) - timings.get("load", 0.0),
        "merge": sum(merge),
        "total": finished - submitted,
    }
    parts["overhead"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
    return {k: round(v, 3) for k, v in parts.items()}

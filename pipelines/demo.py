"""``make demo``: the whole pipeline end to end on the embedded defaults.

Local-folder store (``$MUSETALK_STORE``), a SQLite Dagster instance (``$DAGSTER_HOME``, default
``.musetalk/dagster_home``), the CPU or a GPU, and the official weights in ``$MUSETALK_MODELS`` — or,
when none are there, a demo (random-weight) set written to ``.musetalk/demo-models`` and labelled so.
Steps: push the bundled templates → materialize ``template_cache`` and ``welcome_video`` → submit one
render request (espeak-ng speech) → run ``render_video`` → print the video's key, timings and stats.
It records ``DAGSTER_HOME`` and ``MUSETALK_MODELS`` in ``.env`` (``musetalk_ops.local_env``), so the
README's next commands (``dagster dev -w workspace.yaml``, ``musetalk submit``) find the same instance
and weights with nothing set by hand.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from musetalk_ops.local_env import load_env_file, write_env_file

DEMO_MODELS = Path(".musetalk") / "demo-models"
DEMO_TEXT = "Thanks for trying the MuseTalk pipeline. Every reply becomes a short lip-synced video."
INSTANCE_YAML = """\
# Local Dagster instance written by `make demo` (SQLite storage under this directory); `dagster dev`
# with this DAGSTER_HOME uses it too.
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  runs:
    max_concurrent_runs: {max_concurrent_runs}
  pools:
    default_limit: {gpus}
# A run worker that dies (killed, out of memory) is reported failed by the code server that started
# it: the DefaultRunLauncher cannot health-check or resume a worker, but the code server notices the
# exit within a second. The monitoring daemon then gives the `gpu` pool slots the dead run still
# holds back; without that the retry below would wait for them forever.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180  # a worker that never came up: the run fails (and is retried)
  max_resume_run_attempts: 0  # resuming needs a launcher that supports it (K8sRunLauncher)
  poll_interval_seconds: 5  # one small SQLite query per tick on one machine
  # A dead in-process worker holds no GPU any more; a step process it leaves behind (multiprocess
  # executor) still holds its GPU file lock (GpuSlots), so early release cannot double-book a GPU.
  free_slots_after_run_end_seconds: 5
# Re-execute a run whose worker died, from failure: chunks already rendered are reused, only the
# interrupted step and what follows run again. A run that failed in a step (a bad request, the
# step's own RetryPolicy spent) would fail the same way again: not retried.
run_retries:
  enabled: true
  max_retries: 2
  retry_on_asset_or_op_failure: false
telemetry:
  enabled: false
"""


def instance_yaml(gpus: int = 1, max_concurrent_runs: int = 4) -> str:
    """The local instance's dagster.yaml: `make demo`, `dagster dev` and the tests that run them."""
    return INSTANCE_YAML.format(gpus=gpus, max_concurrent_runs=max_concurrent_runs)


def _prepare_environment() -> str:
    """Set DAGSTER_HOME and MUSETALK_MODELS before Dagster or the definitions are imported."""
    from musetalk_ops.config import models_dir
    from musetalk_ops.errors import ModelFilesError
    from musetalk_ops.models.demo import write_demo_models
    from musetalk_ops.models.layout import check_models, weights_kind

    load_env_file()
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".musetalk", "dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        gpus = os.environ.get("MUSETALK_GPUS") or "1"
        (home / "dagster.yaml").write_text(instance_yaml(gpus=int(gpus)))
    try:
        check_models(models_dir())
    except ModelFilesError as missing:
        print(f"no official weights ({missing}); using demo weights in {DEMO_MODELS}")
        if not (DEMO_MODELS / "musetalk-demo.json").exists():
            write_demo_models(DEMO_MODELS)
        os.environ["MUSETALK_MODELS"] = str(DEMO_MODELS.resolve())
    models = models_dir().resolve()
    write_env_file({"DAGSTER_HOME": str(home), "MUSETALK_MODELS": str(models)})
    return weights_kind(models)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main() -> int:
    weights = _prepare_environment()

    import dagster as dg

    from musetalk_ops import keys
    from musetalk_ops.ids import new_request_id
    from musetalk_ops.store import open_store, push_templates
    from musetalk_ops.timings import STAGES
    from pipelines.assets import speak, template_cache, welcome_video
    from pipelines.definitions import defs
    from pipelines.resources import default_resources
    from pipelines.stats import collect_stats, format_stats

    instance = dg.DagsterInstance.get()
    store = open_store()

    start = _step(f"push templates/ into {store.uri('templates/')}")
    written = push_templates(Path("templates"), store)
    template_ids = sorted({key.split("/")[1] for key in (i.key for i in store.list("templates/"))})
    print(f"{len(written)} objects uploaded; templates: {', '.join(template_ids)}")

    for tid in template_ids:
        start = _step(f"materialize template_cache and welcome_video [{tid}]")
        if not instance.has_dynamic_partition("templates", tid):
            instance.add_dynamic_partitions("templates", [tid])
        result = dg.materialize(
            [template_cache, welcome_video],
            partition_key=tid,
            instance=instance,
            resources=default_resources(),
            raise_on_error=False,
        )
        if not result.success:
            print(f"template {tid} failed: see `dagster dev` → Runs → {result.run_id}", file=sys.stderr)
            return 1
        welcome = [store.uri(info.key) for info in store.list(f"welcome/{tid}/")]
        print(f"done in {time.perf_counter() - start:.1f} s; welcome video: {', '.join(welcome)}")

    template = template_ids[0]
    request_id = new_request_id()
    start = _step(f"render request {request_id} (template {template})")
    with tempfile.TemporaryDirectory() as tmp:
        audio = speak(
            ["espeak-ng", "-v", "en-us", "-w", "{out}", "{text}"], DEMO_TEXT, Path(tmp) / "speech.wav"
        )
        store.put_file(keys.audio(request_id, "wav"), audio)
    instance.add_dynamic_partitions("render_requests", [request_id])  # reserve the id, then the request
    store.put_bytes(
        keys.request(request_id),
        json.dumps({"template": template, "audio": keys.audio(request_id, "wav"), "options": {}}).encode(),
    )
    result = defs.get_job_def("render_video").execute_in_process(
        partition_key=request_id,
        instance=instance,
        tags={"musetalk/template": template},
        raise_on_error=False,
    )
    if not result.success:
        print(f"render failed: see `dagster dev` → Runs → {result.run_id}", file=sys.stderr)
        return 1
    timings = json.loads(store.get_bytes(keys.render_timings(request_id)))
    print(
        f"video: {store.uri(keys.render_video(request_id))} ({timings['frames']} frames, "
        f"{timings['video_seconds']:.2f} s of video in {timings['total']:.1f} s, "
        f"weights {timings['weights']})"
    )
    print(json.dumps({k: timings[k] for k in (*STAGES, "total", "fps", "rtf")}))

    _step("musetalk stats")
    print(format_stats(collect_stats(instance, store)))
    print(f"\nweights: {weights}.  Inspect the runs: make dev (DAGSTER_HOME and MUSETALK_MODELS are in .env)")
    print("A warm worker for direct replies: musetalk serve (README, Warm render workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

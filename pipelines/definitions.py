"""The ``musetalk`` code location (workspace.yaml): every Dagster object, assembled in one place.

Resources and the executor come from the environment (docs/architecture.md §6), read when this
module is imported: by the webserver, the daemon, each run worker and each step process or pod.
"""

import dagster as dg

from pipelines.assets import rendered_video, template_cache, welcome_video
from pipelines.executors import select_executor
from pipelines.jobs import render_video
from pipelines.resources import default_resources
from pipelines.sensors import direct_render_sensor, render_request_sensor, template_sensor


def build_defs() -> dg.Definitions:
    resources = default_resources()
    return dg.Definitions(
        assets=[template_cache, welcome_video, rendered_video],
        jobs=[render_video],
        sensors=[template_sensor, render_request_sensor, direct_render_sensor],
        resources=resources,
        executor=select_executor(gpus=resources["render"].gpu_count),
    )


defs = build_defs()

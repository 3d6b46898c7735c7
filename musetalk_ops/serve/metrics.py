"""The worker's Prometheus metrics (``GET /metrics``), every name prefixed ``musetalk_``."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from musetalk_ops.serve.worker import Worker
from musetalk_ops.timings import STAGES

# Stages of a direct render: the render's own plus the worker's (docs/timings.md §3).
WORKER_STAGES = ("queue", "store")
RECORDED_STAGES = (*WORKER_STAGES, *STAGES, "total")
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Request counts and latencies, per-stage render seconds, queue depth and GPU memory of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "musetalk_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "musetalk_request_seconds",
            "Wall seconds of HTTP requests by endpoint",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.stages = Histogram(
            "musetalk_stage_seconds",
            "Seconds per stage of finished direct renders",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.renders = Counter(
            "musetalk_renders", "Direct renders by outcome", ["outcome"], registry=registry
        )
        Gauge("musetalk_queue_depth", "Replies queued or rendering", registry=registry).set_function(
            lambda: worker.pending
        )
        Gauge("musetalk_ready", "1 once the models are loaded and warmed", registry=registry).set_function(
            lambda: float(worker.ready and not worker.draining)
        )
        Gauge("musetalk_templates_resident", "Templates held in memory", registry=registry).set_function(
            lambda: len(worker.templates)
        )
        gpu = Gauge(
            "musetalk_gpu_memory_bytes",
            "CUDA memory of this process (0 off CUDA)",
            ["kind"],
            registry=registry,
        )
        gpu.labels("allocated").set_function(lambda: _cuda_memory(worker, "memory_allocated"))
        gpu.labels("reserved").set_function(lambda: _cuda_memory(worker, "memory_reserved"))

    def observe(self, outcome: str, record: dict) -> None:
        """Count a render by outcome; a finished one's stage seconds too (its ``renders/<id>.json``)."""
        self.renders.labels(outcome).inc()
        if outcome != "done":
            return
        extra = record.get("extra", {})
        for stage in RECORDED_STAGES:
            value = record.get(stage, extra.get(stage))
            if value is not None:
                self.stages.labels(stage).observe(value)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _cuda_memory(worker: Worker, what: str) -> float:
    models = worker.models
    if models is None or models.device.type != "cuda":
        return 0.0
    import torch

    return float(getattr(torch.cuda, what)(models.device))

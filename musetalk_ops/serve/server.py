"""Running a worker: uvicorn on the API, the models loaded and warmed beside it, a draining shutdown."""

import logging
import threading
import time

import uvicorn

from musetalk_ops.serve.api import create_app
from musetalk_ops.serve.worker import Worker

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT stops new renders (503) and exits once the in-flight ones are done; a
    second one exits at once (uvicorn's own shutdown)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame) -> None:
        if self.worker.draining:  # the second signal: stop now, queued replies are dropped
            self.force_exit = self.should_exit = True
            self.worker.abandon()
            return None
        self.worker.drain()
        log.info(f"draining: {self.worker.pending} render(s) in flight, new ones get 503")
        threading.Thread(target=self._exit_when_idle, name="musetalk-drain", daemon=True).start()

    def _exit_when_idle(self) -> None:
        self.worker.wait_idle()
        self.should_exit = True


def serve(worker: Worker, *, host: str, port: int, token: str | None, preload: list[str] | None) -> int:
    """Serve until stopped; returns the exit status (1 if the worker could not start)."""
    server = DrainingServer(
        uvicorn.Config(
            create_app(worker, token=token), host=host, port=port, log_level="info", access_log=False
        ),
        worker,
    )
    failed: list[str] = []

    def start() -> None:
        begin = time.perf_counter()
        try:
            summary = worker.start(preload)
        except Exception as e:
            failed.append(f"{type(e).__name__}: {e}" if not str(e) else str(e))
            log.error(f"worker {worker.name} could not start: {failed[-1]}")
            server.should_exit = True
            return
        log.info(
            f"worker {worker.name} ready in {time.perf_counter() - begin:.1f} s on {worker.models.device} "
            f"(models {summary['models']} s, {summary['preloaded']} template(s) {summary['templates']} s, "
            f"warm-up {summary['warm_up']} s; {summary['interrupted']} interrupted render(s) recorded)"
        )

    threading.Thread(target=start, name="musetalk-start", daemon=True).start()
    server.run()
    worker.close()
    return 1 if failed else 0

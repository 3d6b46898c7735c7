"""Load test of the whole product under ``dagster dev`` (webserver, daemon, code server, SQLite).

N requests are dropped into ``requests/`` at once (render_request_sensor path) and N more are submitted
through the GraphQL API (``pipelines.submit``), all against the bundled astronaut template with demo
weights and the in-process executor. Checks: every run succeeds, every MP4 decodes with the frame count
and duration of its audio, at most ``--concurrency`` runs execute at once (the run queue), and
``musetalk stats`` counts every request (a failed check exits 1 and names it).

    python -m bench.load_test --sensor 20 --api 20 --concurrency 2   # espeak-ng and sox on PATH

Prints the throughput, the most runs at once and ``musetalk stats``, a table of latency per path (n, p50,
p95, max seconds) and each stage's median seconds per request; ``--json`` prints the whole report.
tests/reliability/test_load.py runs it at a CI-sized N.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FPS = 25
SENTENCES = ("Hello there.", "Thanks for calling, how can I help?", "Sure, one moment please.")


class LoadError(Exception):
    """A check of the load test failed."""


def _speech(out: Path, text: str) -> Path:
    raw = out.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True, timeout=60)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)], check=True, timeout=60)
    raw.unlink()
    return out


def _expected_frames(wav: Path) -> int:
    import soundfile as sf

    info = sf.info(wav)
    return info.frames * FPS // info.samplerate


def start_dagster(env: dict, port: int, log: Path) -> subprocess.Popen:
    """``dagster dev`` in its own process group with default signal handling (docs/architecture.md §7.1)."""

    def reset() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    argv = [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=reset,
        )  # fmt: skip


def stop_dagster(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_until(what: str, check, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = check()
            if found:
                return found
        time.sleep(0.5)
    raise LoadError(f"timed out after {timeout:.0f} s waiting for {what} (log: {log})")


@contextlib.contextmanager
def dagster_with_astronaut(env: dict, port: int, store, log: Path) -> Iterator:
    """``dagster dev`` on ``port`` with the bundled astronaut pushed into ``store`` and prepared by
    ``template_sensor``; yields a GraphQL client of its webserver, stops it at the end."""
    from pipelines.graphql import GraphQLClient
    from pipelines.submit import TEMPLATE_QUERY

    url = f"http://127.0.0.1:{port}"
    proc = start_dagster(env, port, log)
    try:
        wait_until("the webserver", lambda: urllib.request.urlopen(f"{url}/server_info", timeout=2), 180, log)
        for name in ("source.png", "settings.yaml"):
            store.put_file(f"templates/astronaut/{name}", ROOT / "templates" / "astronaut" / name)
        client = GraphQLClient(url, timeout=60)
        wait_until(
            "template_sensor to prepare the template",
            lambda: client.query(TEMPLATE_QUERY, {"template": "astronaut"})["assetOrError"].get(
                "assetMaterializations"
            ),
            600,
            log,
        )
        yield client
    finally:
        stop_dagster(proc)


class RunWatcher(threading.Thread):
    """Samples the instance every 0.25 s: the most runs ever STARTED at once, per request status."""

    def __init__(self, instance):
        super().__init__(daemon=True)
        self.instance, self.max_started, self.stop = instance, 0, threading.Event()

    def run(self) -> None:
        import dagster as dg

        while not self.stop.is_set():
            started = self.instance.get_runs_count(
                filters=dg.RunsFilter(job_name="render_video", statuses=[dg.DagsterRunStatus.STARTED])
            )
            self.max_started = max(self.max_started, started)
            time.sleep(0.25)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def run_load(
    n_sensor: int,
    n_api: int,
    concurrency: int,
    workdir: Path,
    models: Path | None = None,
    timeout: float = 3600,
) -> dict:
    """Run the load test in ``workdir``; returns the report (raises LoadError when a check fails)."""
    import dagster as dg

    from musetalk_ops.models.demo import write_demo_models
    from musetalk_ops.store import LocalStore
    from musetalk_ops.video import probe
    from pipelines.graphql import GraphQLClient
    from pipelines.submit import submit

    workdir.mkdir(parents=True, exist_ok=True)
    if models is None:
        models = workdir / "models"
        if not (models / "musetalk-demo.json").exists():
            write_demo_models(models)
    home = workdir / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(
        f"telemetry:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: {concurrency}\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MUSETALK_STORE": str(workdir / "store"),
        "MUSETALK_CACHE": str(workdir / "cache"),
        "MUSETALK_MODELS": str(models),
        "MUSETALK_DAGSTER_URL": url,
        "MUSETALK_EXECUTOR": "in_process",
        "MUSETALK_GPUS": "1",
    }
    env.pop("MUSETALK_S3_BUCKET", None)
    store = LocalStore(workdir / "store")
    audio = [_speech(workdir / f"speech{i}.wav", text) for i, text in enumerate(SENTENCES)]
    log = workdir / "dagster-dev.log"
    with dagster_with_astronaut(env, port, store, log):
        instance = dg.DagsterInstance.from_config(str(home))
        watcher = RunWatcher(instance)
        watcher.start()

        started_at: dict[str, float] = {}
        audio_of: dict[str, Path] = {}
        t0 = time.time()
        for i in range(n_sensor):  # at once: audio first, then the request object
            rid, wav = f"sensor-{i:03d}", audio[i % len(audio)]
            store.put_file(f"audio/{rid}.wav", wav)
            body = {"template": "astronaut", "audio": f"audio/{rid}.wav", "options": {}}
            store.put_bytes(f"requests/{rid}.json", json.dumps(body).encode())
            started_at[rid], audio_of[rid] = time.time(), wav

        def api(i: int) -> None:
            rid, wav = f"api-{i:03d}", audio[i % len(audio)]
            started_at[rid], audio_of[rid] = time.time(), wav
            submit(store, "astronaut", wav, request_id=rid, client=GraphQLClient(url, timeout=60))

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(api, range(n_api)))

        def finished() -> dict[str, dg.DagsterRun] | None:
            runs: dict[str, list[dg.DagsterRun]] = {}
            for run in instance.get_runs(filters=dg.RunsFilter(job_name="render_video")):
                runs.setdefault(run.tags.get("dagster/partition", ""), []).append(run)
            done = {rid: rs[0] for rid, rs in runs.items() if rid in started_at and rs[0].is_finished}
            return runs if len(done) == len(started_at) else None

        runs = wait_until(f"{len(started_at)} runs to finish", finished, timeout, log)
        wall = time.time() - t0
        watcher.stop.set()
        watcher.join()

        problems, latencies = [], {"sensor": [], "api": []}
        for rid in sorted(started_at):
            if len(runs[rid]) != 1:
                problems.append(f"{rid}: {len(runs[rid])} runs (expected exactly 1)")
            run = runs[rid][0]
            if run.status != dg.DagsterRunStatus.SUCCESS:
                problems.append(f"{rid}: run {run.run_id} {run.status.value}")
                continue
            out = workdir / "out" / f"{rid}.mp4"
            out.parent.mkdir(exist_ok=True)
            store.get_file(f"renders/{rid}.mp4", out)
            info, frames = probe(out), _expected_frames(audio_of[rid])
            if info.frames != frames or abs(info.duration - frames / FPS) > 0.05:
                problems.append(f"{rid}: {info.frames} frames / {info.duration:.3f} s, expected {frames}")
            if info.audio_codec != "aac" or abs(info.audio_duration - frames / FPS) > 0.1:
                problems.append(f"{rid}: audio {info.audio_codec} {info.audio_duration} s")
            end = instance.get_run_stats(run.run_id).end_time
            latencies[rid.split("-")[0]].append(end - started_at[rid])
        if watcher.max_started > concurrency:
            problems.append(f"{watcher.max_started} runs executed at once, over the limit of {concurrency}")
        stats_cmd = [sys.executable, "-m", "musetalk_ops.cli", "stats", "--json"]
        stats = subprocess.run(stats_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if stats.returncode != 0:
            problems.append(f"musetalk stats failed: {stats.stderr.strip()[-300:]}")
            report_stats = {}
        else:
            report_stats = json.loads(stats.stdout)
            total = n_sensor + n_api
            if (report_stats["totalRequests"], report_stats["completedRequests"]) != (total, total):
                problems.append(
                    f"musetalk stats counts {report_stats['totalRequests']} requests, "
                    f"{report_stats['completedRequests']} completed; expected {total}"
                )
        report = {
            "requests": len(started_at),
            "wall_seconds": wall,
            "throughput_per_min": 60 * sum(map(len, latencies.values())) / wall,
            "max_concurrent_runs": watcher.max_started,
            "concurrency_limit": concurrency,
            "latency": {
                path: {
                    "n": len(v),
                    "p50": percentile(v, 50),
                    "p95": percentile(v, 95),
                    "max": max(v, default=0),
                }
                for path, v in latencies.items()
            },
            "stats": {
                k: report_stats.get(k) for k in ("totalRequests", "completedRequests", "completionRate")
            },
            "stage_p50": {k: v["p50"] for k, v in report_stats.get("stages", {}).items()},
            "problems": problems,
        }
        if problems:
            raise LoadError("; ".join(problems))
        return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_report(report: dict) -> str:
    lines = [
        f"requests {report['requests']} in {report['wall_seconds']:.1f} s: "
        f"{report['throughput_per_min']:.2f} renders/min; max {report['max_concurrent_runs']} runs at once "
        f"(limit {report['concurrency_limit']}); musetalk stats: {report['stats']}",
        "| path   |  n | latency p50 (s) | latency p95 (s) | max (s) |",
        "| ------ | -- | --------------- | --------------- | ------- |",
    ]
    for path, p in report["latency"].items():
        lines.append(
            f"| {path:<6} | {p['n']:>2} | {p['p50']:>15.1f} | {p['p95']:>15.1f} | {p['max']:>7.1f} |"
        )
    lines.append("stage p50 (s): " + ", ".join(f"{k} {v}" for k, v in report["stage_p50"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensor", type=int, default=20, help="requests dropped into requests/ at once")
    parser.add_argument("--api", type=int, default=20, help="requests submitted through GraphQL")
    parser.add_argument("--concurrency", type=int, default=2, help="run queue limit (max_concurrent_runs)")
    parser.add_argument("--models", type=Path, help="weights directory (default: demo weights)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp directory)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="musetalk-load-"))
    try:
        report = run_load(args.sensor, args.api, args.concurrency, workdir, args.models)
    except LoadError as e:
        print(f"load test FAILED: {e} (workdir {workdir})", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

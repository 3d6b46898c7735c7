"""The direct reply path of a warm worker against the paths it replaces, in one run.

    python -m bench.serve [--seconds 3] [--requests 8] [--concurrent 4] [--dagster 3] [--batch 8] [--full]

All render the 512² astronaut template (prepared with its manual face box) and the same speech-like
clip. *Before*: ``musetalk render`` in a fresh process per reply, the cost every Dagster step pays
(start, imports, model loading, then the render), timed from outside; and ``--dagster`` replies through
``dagster dev`` and ``musetalk submit --wait`` (in-process runs) with their latency breakdown. *After*:
one ``musetalk serve`` started once (its start-to-ready time is reported), then ``--requests`` replies
one after another, then ``--concurrent`` at once. The overhead of a reply is its wall time at the client
minus the model work its timings report (``audio_features + unet + vae_decode + mux``); the stage table
shows where it goes (queue, store, load). Demo-size models on the CPU unless ``--full`` (full-size
random weights, the GPU's case). Writes ``serve.json`` into ``--out``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench import assets
from bench.common import Report
from bench.load_test import dagster_with_astronaut, free_port
from musetalk_ops.store import LocalStore
from musetalk_ops.template_cache import read_cache
from musetalk_ops.template_store import CacheRef, upload_cache, write_pointer

BIN = Path(sys.executable).parent
MODEL_WORK = ("audio_features", "unet", "vae_decode", "mux")  # what the overhead is measured against
STAGES = ("queue", "store", "load", "audio_features", "unet", "vae_decode", "composite", "encode", "mux")


def stage(timings: dict, name: str) -> float:
    return timings.get(name, timings.get("extra", {}).get(name, 0.0))


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p95": round(p95, 3)}


def post(url: str, wav: Path) -> tuple[float, dict]:
    """One multipart reply; (seconds at the client, the answer's timings)."""
    boundary = "musetalkbench"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="template"\r\n\r\nastronaut\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="reply.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    body = head + wav.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{url}/v1/renders", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        timings = json.loads(answer.read())["timings"]
    return time.perf_counter() - start, timings


def direct_rows(runs: list[tuple[float, dict]]) -> dict:
    walls = [wall for wall, _ in runs]
    overhead = [wall - sum(stage(t, s) for s in MODEL_WORK) for wall, t in runs]
    return {
        "wall": summary(walls),
        "overhead": summary(overhead),
        "stages": {s: round(statistics.median(stage(t, s) for _, t in runs), 4) for s in STAGES},
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="length of a reply (default 3 s)")
    p.add_argument("--requests", type=int, default=8, help="replies one after another (default 8)")
    p.add_argument("--concurrent", type=int, default=4, help="replies at once (default 4)")
    p.add_argument("--cold", type=int, default=3, help="cold-process baseline replies (default 3)")
    p.add_argument("--batch", type=int, default=8, help="render batch size (default 8)")
    p.add_argument(
        "--dagster", type=int, default=3, help="replies through dagster dev and musetalk submit (0: none)"
    )
    p.add_argument("--full", action="store_true", help="full-size random weights instead of the demo set")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")), help="report folder")
    args = p.parse_args()
    report = Report(args.out, 3600, sys.argv, filename="serve.json")
    r = report.data
    work = Path(tempfile.mkdtemp(prefix="musetalk-bench-serve-"))
    models = work / "models"
    assets.write_model_set(models, work, args.full)
    png, _video = assets.write_sources(work)
    cache, _ = assets.prepare(png, work / "astronaut", assets.ASTRONAUT_BOX, models, "astronaut")
    wav = assets.write_speech_like(work / "reply.wav", args.seconds + 0.02)
    store = LocalStore(work / "store")
    template = read_cache(cache)
    ref = CacheRef("astronaut", template.fingerprint, template.weights)
    upload_cache(store, cache, ref.prefix)
    write_pointer(store, ref)
    env = {**os.environ, "MUSETALK_STORE": str(work / "store"), "MUSETALK_MODELS": str(models)}
    env["MUSETALK_CACHE"] = str(work / "cache")
    r["env"] = {"cpus": len(os.sched_getaffinity(0)), "seconds": args.seconds, "batch": args.batch}

    cold = []
    for n in range(args.cold):
        stats = work / f"cold{n}.json"
        argv = [str(BIN / "musetalk"), "render", "--template", str(cache), "--audio", str(wav)]
        argv += [
            "--out",
            str(work / f"cold{n}.mp4"),
            "--batch-size",
            str(args.batch),
            "--stats-json",
            str(stats),
        ]
        start = time.perf_counter()
        subprocess.run([*argv, "--no-progress"], env=env, check=True, capture_output=True)
        cold.append((time.perf_counter() - start, json.loads(stats.read_text())))
    r["cold_process"] = direct_rows(cold)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "musetalk"), "serve", "--port", str(port), "--batch-size", str(args.batch)]
    start = time.perf_counter()
    with (
        open(work / "serve.log", "wb") as log,
        subprocess.Popen(argv, env=env, stdout=log, stderr=log) as worker,
    ):
        try:
            wait_ready(url, worker, work / "serve.log")
            r["worker_start_to_ready_s"] = round(time.perf_counter() - start, 2)
            post(url, wav)  # the first reply after the start (not counted: it meets the pointer cold)
            r["direct"] = direct_rows([post(url, wav) for _ in range(args.requests)])
            r["concurrent"] = concurrent_replies(url, wav, args.concurrent)
        finally:
            worker.terminate()
    if args.dagster:  # after the worker: the template sensor rewrites the template's pointer
        r["dagster"] = dagster_replies(work, env, wav, args.dagster, args.batch)
    report.save()
    print_tables(r)
    return 0


def dagster_replies(work: Path, env: dict, wav: Path, count: int, batch: int) -> dict:
    """``musetalk submit --wait``'s path under ``dagster dev`` (in-process runs, the template prepared by
    its sensor): wall time at the client and the latency breakdown ``wait`` reports, per reply."""
    from musetalk_ops.store import LocalStore
    from pipelines.demo import instance_yaml
    from pipelines.submit import submit, wait

    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(gpus=1))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "DAGSTER_HOME": str(home), "MUSETALK_DAGSTER_URL": url, "MUSETALK_EXECUTOR": "in_process"}
    env["MUSETALK_GPUS"] = "1"
    store = LocalStore(work / "store")
    runs = []
    with dagster_with_astronaut(env, port, store, work / "dagster-dev.log") as client:
        for _ in range(count + 1):  # the first run meets a cold code server: not counted
            start = time.perf_counter()
            done = wait(
                submit(store, "astronaut", wav, options={"batch_size": batch}, client=client), store, client
            )
            runs.append((time.perf_counter() - start, done.result))
    rows = direct_rows([(wall, result["timings"]) for wall, result in runs[1:]])
    keys = runs[1][1]["latency"]
    rows["latency"] = {k: round(statistics.median(r["latency"][k] for _, r in runs[1:]), 3) for k in keys}
    return rows


def wait_ready(url: str, worker: subprocess.Popen, log: Path) -> None:
    while True:
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.1)
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited: {log.read_text()[-2000:]}")


def concurrent_replies(url: str, wav: Path, count: int) -> dict:
    results: list[tuple[float, dict]] = []
    threads = [threading.Thread(target=lambda: results.append(post(url, wav))) for _ in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {**direct_rows(results), "replies_per_s": round(len(results) / elapsed, 3)}


def print_tables(r: dict) -> None:
    paths = [
        ("cold process per reply", "cold_process"),
        ("warm worker", "direct"),
        ("warm, concurrent", "concurrent"),
    ]
    if "dagster" in r:
        paths.insert(0, ("dagster dev + submit --wait", "dagster"))
    print(f"\nreply of {r['env']['seconds']:g} s, batch {r['env']['batch']}, {r['env']['cpus']} CPUs")
    print(f"worker start → ready: {r['worker_start_to_ready_s']} s")
    print(f"{'path':<28}{'n':>3}{'wall p50':>10}{'p95':>8}{'overhead p50':>14}{'p95':>8}")
    for name, key in paths:
        row = r[key]
        print(
            f"{name:<28}{row['wall']['n']:>3}{row['wall']['p50']:>10.3f}{row['wall']['p95']:>8.3f}"
            f"{row['overhead']['p50']:>14.3f}{row['overhead']['p95']:>8.3f}"
        )
    print(f"\nmedian seconds per stage{'':<6}" + "".join(f"{s[:10]:>11}" for s in STAGES))
    for name, key in paths:
        if key != "concurrent":
            print(f"{name:<30}" + "".join(f"{r[key]['stages'][s]:>11.3f}" for s in STAGES))
    if "dagster" in r:
        print(
            "dagster path, median seconds: "
            + ", ".join(f"{k} {v}" for k, v in r["dagster"]["latency"].items())
        )
    print(f"\nconcurrent throughput: {r['concurrent']['replies_per_s']} replies/s")


if __name__ == "__main__":
    sys.exit(main())

"""``musetalk submit`` and ``musetalk stats``: added to the ``musetalk`` console script through the
``musetalk.commands`` entry point (pyproject.toml), which catches MuseTalkError and prints it as one line.
Dagster is imported only when one of them runs."""

import argparse
import json
import sys
from pathlib import Path

from musetalk_ops.local_env import load_env_file
from musetalk_ops.options import OPTIONS, REQUEST_OPTIONS
from musetalk_ops.store import open_store
from musetalk_ops.timings import Timings
from pipelines.graphql import GraphQLClient


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``submit`` and ``stats`` to the ``musetalk`` parser's subcommands."""
    s = sub.add_parser("submit", help="submit a render request to the Dagster pipeline")
    s.add_argument("--template", required=True, help="template id (a materialized template_cache partition)")
    s.add_argument("--audio", required=True, type=Path, help="speech: wav, flac, mp3, m4a/aac or ogg")
    s.add_argument("--id", dest="request_id", help="request id (default: r<UTC time>-<random>)")
    s.add_argument("--wait", action="store_true", help="wait for the run; print the output key and timings")
    s.add_argument("--timeout", type=float, default=1800.0, help="--wait limit in seconds (default 1800)")
    for name in REQUEST_OPTIONS:
        OPTIONS[name].add_flag(s, with_default=False)
    s.add_argument(
        "--url", help="Dagster webserver (default: $MUSETALK_DAGSTER_URL or http://127.0.0.1:3000)"
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(handler=cmd_submit)
    t = sub.add_parser("stats", help="request statistics and per-stage timings")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.add_argument("--models", help="weights directory to report on (default: $MUSETALK_MODELS or ./models)")
    t.add_argument(
        "--url", help="Dagster webserver (default: $MUSETALK_DAGSTER_URL or http://127.0.0.1:3000)"
    )
    t.set_defaults(handler=cmd_stats)


def cmd_submit(args: argparse.Namespace) -> int:
    load_env_file()  # the instance and weights `make demo` recorded, as dagster dev loads them
    from pipelines.submit import submit, wait

    store = open_store()
    client = GraphQLClient(args.url)
    options = {name: value for name in REQUEST_OPTIONS if (value := getattr(args, name)) is not None}
    submission = submit(
        store, args.template, args.audio, request_id=args.request_id, options=options, client=client
    )
    if not args.json:
        print(f"submitted request {submission.request_id}: run {submission.run_id} ({submission.url})")
    if args.wait:
        wait(submission, store, client, timeout=args.timeout)
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": submission.request_id,
                    "run_id": submission.run_id,
                    "url": submission.url,
                    "status": submission.status,
                    "video": store.uri(submission.video_key),
                    **submission.result,
                },
                indent=1,
            )
        )
    elif args.wait and submission.status == "SUCCESS":
        print(f"{submission.status}: {store.uri(submission.video_key)}")
        print(Timings.from_dict(submission.result["timings"]).summary())
        print("latency  " + ", ".join(f"{k} {v:.2f} s" for k, v in submission.result["latency"].items()))
    elif args.wait:
        print(f"{submission.status}: run {submission.url}", file=sys.stderr)
        for error in submission.result.get("errors", []):
            print(f"  {error}", file=sys.stderr)
    return 0 if not args.wait or submission.status == "SUCCESS" else 1


def cmd_stats(args: argparse.Namespace) -> int:
    load_env_file()
    from pipelines.stats import collect_stats, format_stats, instance_from_env

    with instance_from_env() as instance:
        stats = collect_stats(
            instance, open_store(), models=args.models, client=GraphQLClient(args.url, timeout=3.0)
        )
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0

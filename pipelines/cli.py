"""``musetalk submit`` and ``musetalk stats`` (dispatched here by ``musetalk_ops.cli``, which catches
MuseTalkError and prints it as one line)."""

import argparse
import json
import sys
from pathlib import Path

from musetalk_ops.store import open_store
from musetalk_ops.timings import Timings
from pipelines.graphql import GraphQLClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("submit", help="submit a render request to the Dagster pipeline")
    s.add_argument("--template", required=True, help="template id (a materialized template_cache partition)")
    s.add_argument("--audio", required=True, type=Path, help="speech: wav, flac, mp3, m4a/aac or ogg")
    s.add_argument("--id", dest="request_id", help="request id (default: r<UTC time>-<random>)")
    s.add_argument("--wait", action="store_true", help="wait for the run; print the output key and timings")
    s.add_argument("--timeout", type=float, default=1800.0, help="--wait limit in seconds (default 1800)")
    s.add_argument("--batch-size", type=int, help="request option batch_size")
    s.add_argument("--crf", type=int, help="request option crf")
    s.add_argument("--preset", help="request option preset (x264)")
    s.add_argument("--fps", type=float, help="request option fps (default: the template's)")
    s.add_argument(
        "--url", help="Dagster webserver (default: $MUSETALK_DAGSTER_URL or http://127.0.0.1:3000)"
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    t = sub.add_parser("stats", help="request statistics and per-stage timings")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.add_argument("--models", help="weights directory to report on (default: $MUSETALK_MODELS or ./models)")
    t.add_argument(
        "--url", help="Dagster webserver (default: $MUSETALK_DAGSTER_URL or http://127.0.0.1:3000)"
    )
    return parser


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import submit, wait

    store = open_store()
    client = GraphQLClient(args.url)
    options = {k: v for k in ("batch_size", "crf", "preset", "fps") if (v := getattr(args, k)) is not None}
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
    from pipelines.stats import collect_stats, format_stats, instance_from_env

    with instance_from_env() as instance:
        stats = collect_stats(
            instance, open_store(), models=args.models, client=GraphQLClient(args.url, timeout=3.0)
        )
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def main(argv: list[str]) -> int:
    """``argv`` starts with the subcommand: ``["submit", "--template", ...]`` or ``["stats", ...]``."""
    args = build_parser().parse_args(argv)
    return {"submit": cmd_submit, "stats": cmd_stats}[args.command](args)

"""The ``musetalk`` console script.

Engine subcommands (``render``, ``prepare``, ``models``, ``engine``, ``templates``) live here and never import
Dagster. Other installed packages add theirs through the ``musetalk.commands`` entry point group (the
Dagster code location adds ``submit`` and ``stats``), so this package never imports them by name.
A user mistake prints one line and exits 2; an interrupted command exits 130 and leaves no output.
"""

import argparse
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from musetalk_ops.errors import InputError, MuseTalkError
from musetalk_ops.options import OPTIONS, VERSIONS
from musetalk_ops.render.settings import RenderSettings

log = logging.getLogger("musetalk_ops.cli")  # also when run as __main__

COMMAND_GROUP = "musetalk.commands"  # entry points: functions that add subcommands to the parser

RENDER_FLAGS = ("batch_size", "fps", "crf", "preset", "mode", "encoders")  # `render`'s own options
SERVE_FLAGS = ("batch_size", "crf", "preset", "mode", "encoders")  # a worker's (fps is per request)


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        type=Path,
        help="official-layout weights directory (default: $MUSETALK_MODELS or ./models)",
    )
    for name in ("version", "device", "dtype"):
        OPTIONS[name].add_flag(p)


def _render_settings(args: argparse.Namespace, **more: object) -> RenderSettings:
    """``RenderSettings`` from the ``_add_runtime_flags`` flags plus a command's own (``more``)."""
    return RenderSettings(
        device=args.device, dtype=args.dtype, version=args.version, models_root=args.models, **more
    )


def _parse_box(text: str) -> list[int]:
    try:
        box = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bbox {text!r}: expected four integers x1,y1,x2,y2") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise argparse.ArgumentTypeError(
            f"--bbox {text!r}: expected x1,y1,x2,y2 with x2 > x1 >= 0, y2 > y1 >= 0"
        )
    return box


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk", description="MuseTalk v1.5 lip-sync rendering.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("render", help="render a lip-synced MP4 from a template and speech audio")
    r.add_argument(
        "--template",
        required=True,
        type=Path,
        help="template cache dir, official realtime avatar dir, a source image/video, or the id of a "
        "template prepared in the store",
    )
    r.add_argument("--audio", required=True, type=Path, help="speech: wav, flac, mp3, m4a/aac or ogg")
    r.add_argument("--out", required=True, type=Path, help="output .mp4")
    _add_runtime_flags(r)
    for name in RENDER_FLAGS:
        OPTIONS[name].add_flag(r)
    r.add_argument("--frames-dir", type=Path, help="also write every frame as lossless PNG 00000000.png…")
    r.add_argument("--stats-json", type=Path, help="write the timings as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("prepare", help="preprocess a template source into a template cache")
    p.add_argument("source", type=Path, help="image (jpg, png, webp) or video (mp4, mov, webm, mkv)")
    p.add_argument("--out", required=True, type=Path, help="cache directory to write")
    p.add_argument("--id", dest="template_id", help="template id (default: derived from the file name)")
    _add_runtime_flags(p)
    p.add_argument("--settings", type=Path, help="settings.yaml (default: the one beside the source, if any)")
    p.add_argument("--bbox", type=_parse_box, help="manual landmark box x1,y1,x2,y2 (before extra margin)")
    p.add_argument("--extra-margin", type=int)
    p.add_argument("--parsing-mode", choices=("jaw", "raw"))
    p.add_argument("--mask-source", choices=("parsing", "landmarks"))
    p.add_argument("--fps", type=float, help="frame rate for image templates (default 25)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")

    m = sub.add_parser("models", help="manage the official weights directory")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    demo = msub.add_parser("demo", help="write a seeded random-weight set in the official layout")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    dl = msub.add_parser("download", help="download the official weights (needs internet)")
    dl.add_argument("dir", type=Path)
    chk = msub.add_parser("check", help="check that a weights directory is complete and loadable")
    chk.add_argument("dir", type=Path)
    chk.add_argument("--version", choices=VERSIONS, default=VERSIONS[0])
    conv = msub.add_parser("convert", help="write fp16 safetensors copies under $MUSETALK_CACHE")
    conv.add_argument("dir", type=Path)

    e = sub.add_parser("engine", help="ahead-of-time compiled UNet + VAE engines (one per GPU type)")
    esub = e.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    build = esub.add_parser("build", help="compile the engine for this GPU and batch size (minutes, once)")
    _add_runtime_flags(build)
    OPTIONS["batch_size"].add_flag(build)
    build.add_argument(
        "--autotune",
        action="store_true",
        help="tune kernels (Inductor max-autotune and coordinate descent): faster, builds for many minutes",
    )
    build.add_argument("--dir", type=Path, help="engines directory (default: $MUSETALK_CACHE/engines)")
    build.add_argument(
        "--part", help="build only this part, e.g. unet-b64 (the missing ones are built in parallel)"
    )

    w = sub.add_parser("serve", help="a warm render worker: models resident, replies over HTTP (README)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    w.add_argument("--port", type=int, default=8000, help="port (default 8000; --per-gpu: the first)")
    _add_runtime_flags(w)
    for name in SERVE_FLAGS:
        OPTIONS[name].add_flag(w)
    w.add_argument(
        "--preload-templates",
        default="all",
        help="templates to load and keep resident at start: all (every prepared one), none, or id,id,…",
    )
    w.add_argument("--queue", type=int, default=16, help="replies queued or rendering at most (then 429)")
    w.add_argument(
        "--template-memory-mb", type=int, default=2048, help="memory for resident templates (default 2048)"
    )
    w.add_argument(
        "--name", help="worker name in records (default: <host name>-<port>; keep it across restarts)"
    )
    w.add_argument(
        "--per-gpu", action="store_true", help="one worker per visible GPU, on consecutive ports from --port"
    )

    v = sub.add_parser("verify", help="check a video's content credentials (C2PA): present, intact, signed")
    v.add_argument("file", type=Path)
    v.add_argument("--trust", type=Path, help="trust anchors, PEM (default: $MUSETALK_C2PA_TRUST)")
    v.add_argument("--require-trusted", action="store_true", help="also fail a chain no trust anchor accepts")
    v.add_argument("--json", action="store_true", help="print the findings as JSON")
    c = sub.add_parser("credentials", help="signing identities for content credentials")
    csub = c.add_subparsers(dest="credentials_command", required=True, metavar="ACTION")
    dev = csub.add_parser("dev-cert", help="write a TEST signing chain (root + signer) for local use")
    dev.add_argument("--dir", type=Path, default=Path(".musetalk/credentials"), help="where to write it")

    t = sub.add_parser("templates", help="manage the templates in the object store")
    tsub = t.add_subparsers(dest="templates_command", required=True, metavar="ACTION")
    push = tsub.add_parser("push", help="upload templates/<id>/ folders into the store")
    push.add_argument("dir", type=Path, nargs="?", default=Path("templates"))

    for command, handler in (
        (r, cmd_render),
        (p, cmd_prepare),
        (m, cmd_models),
        (e, cmd_engine),
        (w, cmd_serve),
        (v, cmd_verify),
        (c, cmd_credentials),
        (t, cmd_templates),
    ):
        command.set_defaults(handler=handler)
    for entry in entry_points(group=COMMAND_GROUP):
        entry.load()(sub)  # adds its subcommands, each with set_defaults(handler=...)
    return parser


def _check_writable(out: Path) -> None:
    """A file can be created beside ``out`` (the render writes a temporary name there, then renames)."""
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")
    try:
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None


def cmd_render(args: argparse.Namespace) -> int:
    from musetalk_ops.ids import ID_PATTERN

    for name in ("template", "audio"):  # before importing torch: a typo fails in milliseconds
        path = getattr(args, name)
        if not path.exists() and not (name == "template" and ID_PATTERN.fullmatch(str(path))):
            raise InputError(f"--{name} {path}: no such file or directory")
    _check_writable(args.out)
    from musetalk_ops.render.file import render_file

    settings = _render_settings(args, **{name: getattr(args, name) for name in RENDER_FLAGS})
    timings = render_file(
        args.template,
        args.audio,
        args.out,
        settings,
        frames_dir=args.frames_dir,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if timings.weights == "demo":
        print("note: rendered with demo (random) weights: the mouth is noise, not lip-sync", file=sys.stderr)
    signed = "signed" if "sign" in timings.extra else "unsigned"
    print(f"wrote {args.out} ({timings.frames} frames, {timings.video_seconds:.2f} s, {signed})")
    print(timings.summary())
    if args.stats_json:
        from musetalk_ops.files import write_json

        write_json(args.stats_json, timings.to_dict())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import dataclasses

    from musetalk_ops.ids import default_template_id, validate_id
    from musetalk_ops.prepare import prepare_template
    from musetalk_ops.settings import load_settings

    if not args.source.is_file():
        raise InputError(f"{args.source}: no such file")
    settings_path = args.settings or args.source.parent / "settings.yaml"
    settings = load_settings(settings_path if settings_path.exists() else None)
    overrides = {
        "face_box": args.bbox,
        "extra_margin": args.extra_margin,
        "parsing_mode": args.parsing_mode,
        "mask_source": args.mask_source,
        "version": args.version,
        "fps": args.fps,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    template_id = validate_id(args.template_id or default_template_id(args.source), "template id")
    out = prepare_template(
        args.source,
        args.out,
        template_id=template_id,
        settings=settings,
        models_root=args.models,
        device=args.device,
        dtype=args.dtype,
        force=args.force,
        progress=sys.stderr.isatty(),
    )
    print(f"wrote template cache {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from musetalk_ops import models

    if args.models_command == "demo":
        from musetalk_ops.models.demo import write_demo_models

        write_demo_models(args.dir, seed=args.seed)
        print(f"wrote demo (random) weights to {args.dir}: renders made with them are labelled weights=demo")
    elif args.models_command == "download":
        from musetalk_ops.models.download import download_models

        download_models(args.dir)
        print(f"downloaded the official weights to {args.dir}")
    elif args.models_command == "check":
        import torch

        from musetalk_ops.models.layout import check_models, weights_kind

        check_models(args.dir, version=args.version)
        models.load_models(
            args.dir,
            version=args.version,
            device=torch.device("cpu"),
            dtype=torch.float32,
            components=("unet", "vae", "whisper", "bisenet"),
        )
        print(f"{args.dir}: complete and loadable ({args.version}, weights {weights_kind(args.dir)})")
    else:
        from musetalk_ops.models.convert import convert_models

        written = convert_models(args.dir)
        print(f"converted {len(written)} files to fp16 safetensors under $MUSETALK_CACHE")
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    """Build the engine's missing packages: one in this process, several at once, each in its own
    process (``--part``), so that the wall time is the slowest part's, not the sum (bench/RESULTS.md)."""
    import time

    from musetalk_ops.config import dtype_name
    from musetalk_ops.engine.build import build_step
    from musetalk_ops.engine.spec import engine_specs, find_step
    from musetalk_ops.engine.steps import engine_steps
    from musetalk_ops.render.models import load_render_models

    settings = _render_settings(args, batch_size=args.batch_size)
    models = load_render_models(settings, version=args.version or "v15", components=("unet", "vae"))
    specs = engine_specs(models.unet, models.vae, args.batch_size, autotune=args.autotune)
    if args.part and args.part not in specs:
        raise InputError(
            f"an engine for batch {args.batch_size} has no part {args.part!r}: {', '.join(specs)}"
        )
    parts = [args.part] if args.part else list(specs)
    missing = [part for part in parts if find_step(specs[part], args.dir) is None]
    start = time.perf_counter()
    if len(missing) == 1:
        spec = specs[missing[0]]
        build_step(
            spec, engine_steps(models.unet, models.vae)[spec.step], models.device, args.dir, log=log.info
        )
    elif missing:
        flags = ["--batch-size", str(args.batch_size), "--device", str(models.device)]
        flags += ["--dtype", dtype_name(models.dtype), "--version", args.version or "v15"]
        if args.models:
            flags += ["--models", str(args.models)]
        if args.dir:
            flags += ["--dir", str(args.dir)]
        if args.autotune:
            flags.append("--autotune")
        log.info(f"building {', '.join(missing)} side by side, each in its own process (minutes)")
        _run_children(
            [
                [sys.executable, "-m", "musetalk_ops.cli", "engine", "build", *flags, "--part", part]
                for part in missing
            ]
        )
    print(f"engine for {models.device} at batch {args.batch_size} ({time.perf_counter() - start:.0f} s):")
    for part in parts:
        print(f"  {part}: {find_step(specs[part], args.dir)}")
    return 0


def _run_children(commands: list[list[str]]) -> None:
    """Run ``commands`` at once, their stderr (progress) passed on to this one's; a failure raises the
    first failing one's last line (its one-line error) as this command's error."""
    import threading

    from musetalk_ops.errors import EngineError

    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for command in commands]
    last: dict[int, str] = {}

    def relay(i: int, stream) -> None:
        for line in stream:
            sys.stderr.write(line)
            last[i] = line.strip()

    relays = [threading.Thread(target=relay, args=(i, p.stderr)) for i, p in enumerate(procs)]
    for thread in relays:
        thread.start()
    for proc, thread in zip(procs, relays, strict=True):
        proc.wait()
        thread.join()
    for i, proc in enumerate(procs):
        if proc.returncode != 0:
            raise EngineError(last.get(i, f"exit {proc.returncode}").removeprefix("musetalk: error: "))


def cmd_serve(args: argparse.Namespace) -> int:
    """Check what a user can get wrong in milliseconds, then load, warm and serve (docs: README)."""
    import os

    from musetalk_ops.config import models_dir
    from musetalk_ops.ids import validate_id
    from musetalk_ops.local_env import load_env_file
    from musetalk_ops.models.layout import check_models
    from musetalk_ops.store import open_store

    if not 0 < args.port < 65536 or args.queue < 1 or args.template_memory_mb < 1:
        raise InputError("--port must be 1-65535, --queue and --template-memory-mb positive")
    load_env_file()  # the store and weights `make demo` recorded, as dagster dev loads them
    if args.per_gpu:
        return _serve_per_gpu(args)
    check_models(models_dir(args.models), version=args.version or VERSIONS[0])
    preload = None if args.preload_templates == "all" else []
    if args.preload_templates not in ("all", "none"):
        preload = [validate_id(t.strip(), "template id") for t in args.preload_templates.split(",")]
    token = os.environ.get("MUSETALK_WORKER_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("warning: serving beyond this machine without MUSETALK_WORKER_TOKEN: anyone can render")
    from musetalk_ops.serve.server import serve
    from musetalk_ops.serve.worker import Worker

    settings = _render_settings(args, **{name: getattr(args, name) for name in SERVE_FLAGS})
    worker = Worker(
        open_store(),
        settings,
        name=validate_id(args.name or _default_worker_name(args.port), "worker name"),
        queue_limit=args.queue,
        template_budget_bytes=args.template_memory_mb << 20,
    )
    return serve(worker, host=args.host, port=args.port, token=token, preload=preload)


def _default_worker_name(port: int) -> str:
    import re
    import socket

    return re.sub(r"[^a-z0-9_-]", "-", f"{socket.gethostname().lower()}-{port}").strip("-_")[-64:]


def _serve_per_gpu(args: argparse.Namespace) -> int:
    """``serve`` once per visible GPU (``--device cuda:N``, port ``--port + N``); SIGTERM drains them all."""
    import signal

    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise InputError("--per-gpu: no CUDA GPU is visible here (start one worker with --device cpu)")
    argv = [a for a in sys.argv[1:] if a != "--per-gpu"]
    children = []
    for index in range(count):
        flags = ["--device", f"cuda:{index}", "--port", str(args.port + index)]
        if args.name:  # one name per worker: a restart records only its own interrupted renders
            flags += ["--name", f"{args.name[:58]}-gpu{index}"]
        children.append(subprocess.Popen([sys.executable, "-m", "musetalk_ops.cli", *argv, *flags]))
    signal.signal(signal.SIGTERM, lambda *_: [c.send_signal(signal.SIGTERM) for c in children])
    codes = [child.wait() for child in children]
    return 0 if all(code == 0 for code in codes) else 1


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 for intact, validly signed credentials (and trusted, with --require-trusted), else 1."""
    import json

    from musetalk_ops.credentials import verify_video

    if not args.file.is_file():
        raise InputError(f"{args.file}: no such file")
    found = verify_video(args.file, args.trust)
    ok = found.signed and (found.trusted or not args.require_trusted)
    if args.json:
        print(json.dumps({"file": str(args.file), "ok": ok, **vars(found)}, indent=1))
        return 0 if ok else 1
    if found.state is None:
        print(f"{args.file}: no content credentials")
        return 1
    if not found.signed:
        print(f"{args.file}: content credentials INVALID: {', '.join(found.failures) or found.state}")
        return 1
    trust = "trusted" if found.trusted else "valid, signer not trusted (no trust anchor accepts it)"
    print(f"{args.file}: content credentials intact and signed: {trust}")
    print(f"  signer            {found.signer} (issuer {found.issuer})")
    print(f"  generator         {found.generator}")
    print(f"  source type       {found.source_type}")
    for key, value in found.provenance.items():
        print(f"  {key:<17} {value}")
    return 0 if ok else 1


def cmd_credentials(args: argparse.Namespace) -> int:
    from musetalk_ops.credentials import write_dev_certificate

    paths = write_dev_certificate(args.dir)
    print("wrote a TEST signing chain (not for production: a real deployment uses a CA-issued certificate):")
    for variable, path in paths.items():
        print(f"  export {variable}={path.resolve()}")
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    from musetalk_ops.store import open_store, push_templates

    if not args.dir.is_dir():
        raise InputError(f"{args.dir}: no such directory")
    store = open_store()
    written = push_templates(args.dir, store)
    print(f"uploaded {len(written)} objects to {store.uri('templates/')}")
    for key in written:
        print(f"  {key}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: warnings only
    logging.getLogger("musetalk_ops").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return _guard(lambda: args.handler(args))


def _guard(run) -> int:
    try:
        return run()
    except MuseTalkError as exc:
        print(f"musetalk: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("musetalk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

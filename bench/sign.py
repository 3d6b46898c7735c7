"""What signing content credentials costs a reply: one C2PA signature of a finished MP4.

    python -m bench.sign [--seconds 3] [--size 512] [--runs 20]

Encodes ``--seconds`` of the astronaut at ``--size``² with speech-like audio, muxed as the product muxes a
reply (no models needed: the cost depends on the file, not on its pixels), writes a test signing chain,
then signs the file ``--runs`` times (``credentials.sign_video`` on a fresh copy each time) and prints
min/median/max milliseconds, with the unsigned and signed sizes. Writes ``sign.json`` into ``--out``.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

from bench import assets
from bench.common import Report
from musetalk_ops.credentials import CERT_ENV, KEY_ENV, Provenance, sign_video, write_dev_certificate
from musetalk_ops.video import GENERATED_COMMENT, SegmentWriter, mux


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sign", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="length of the reply (default 3 s)")
    p.add_argument("--size", type=int, default=512, help="frame width and height (default 512)")
    p.add_argument("--runs", type=int, default=20, help="signatures timed (default 20)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")), help="report folder")
    args = p.parse_args()
    report = Report(args.out, 3600, sys.argv, filename="sign.json")
    work = Path(tempfile.mkdtemp(prefix="musetalk-bench-sign-"))
    frame = cv2.resize(assets.astronaut(), (args.size, args.size))
    frames = round(args.seconds * 25)
    with SegmentWriter(work / "segment.mp4", 25, args.size, args.size) as writer:
        for i in range(frames):
            writer.write(cv2.GaussianBlur(frame, (3, 3), 0.5 + (i % 5) * 0.1))
    wav = assets.write_speech_like(work / "reply.wav", args.seconds + 0.02)
    mux([work / "segment.mp4"], wav, work / "reply.mp4", comment=GENERATED_COMMENT)
    paths = write_dev_certificate(work / "credentials")
    os.environ[CERT_ENV], os.environ[KEY_ENV] = str(paths[CERT_ENV]), str(paths[KEY_ENV])
    provenance = Provenance("v15", "demo", "astronaut", "0" * 16, "bench")
    seconds = []
    for n in range(args.runs + 1):  # the first signature loads the library: not counted
        copy = work / f"signed{n}.mp4"
        shutil.copyfile(work / "reply.mp4", copy)
        start = time.perf_counter()
        sign_video(copy, provenance)
        if n:
            seconds.append(time.perf_counter() - start)
    ms = sorted(s * 1000 for s in seconds)
    r = report.data
    r.update(
        frames=frames,
        size=args.size,
        unsigned_bytes=(work / "reply.mp4").stat().st_size,
        signed_bytes=copy.stat().st_size,
        sign_ms={"min": round(ms[0], 2), "median": round(statistics.median(ms), 2), "max": round(ms[-1], 2)},
        cpus=len(os.sched_getaffinity(0)),
    )
    report.save()
    print(f"{frames} frames at {args.size}², {r['unsigned_bytes']} → {r['signed_bytes']} bytes")
    t = r["sign_ms"]
    print(f"signing, {args.runs} runs: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

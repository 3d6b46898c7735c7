"""One cold start: a fresh interpreter renders a short clip and prints, as one JSON line, when each step
was done (``marks``: interpreter, imports, template, models, features, first_frame, segment_done, as
Unix times), the frames, the heavy modules it imported and the render's timings.

    python -m bench.cold_start MODE BATCH MODELS TEMPLATE_CACHE WAV OUT [FEATURES]

MODE is a render mode, or ``default`` for the one RenderSettings picks; BATCH the render batch size (an
``aot`` render needs an engine built for it). With ``FEATURES`` (an audio step's ``features.safetensors``)
the process is a render step: UNet and VAE only, no whisper; without, it is the CLI (whisper computes the
features in the process). It imports only what that path imports, so the marks are the engine's own;
``bench.render``'s ``cold_start`` and ``aot`` sections run it and read the marks from the moment they
spawned the process.
"""

import time

MARKS = {"interpreter": time.time()}

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from musetalk_ops.audio import AudioFeatures  # noqa: E402
from musetalk_ops.render.chunks import render_chunk  # noqa: E402
from musetalk_ops.render.models import compute_features, load_render_models  # noqa: E402
from musetalk_ops.render.settings import RenderSettings  # noqa: E402
from musetalk_ops.template_cache import load_template  # noqa: E402


def main(
    mode: str, batch: str, models_root: str, cache: str, wav: str, out: str, features_file: str = ""
) -> None:
    MARKS["imports"] = time.time()
    settings = RenderSettings(
        models_root=Path(models_root), mode=None if mode == "default" else mode, batch_size=int(batch)
    )
    template = load_template(cache)
    MARKS["template"] = time.time()
    components = ("unet", "vae") if features_file else ("unet", "vae", "whisper")
    models = load_render_models(settings, version=template.version, components=components)
    MARKS["models"] = time.time()
    features = (
        AudioFeatures.load(Path(features_file)) if features_file else compute_features(models, Path(wav))
    )
    MARKS["features"] = time.time()

    def first(_n: int) -> None:
        MARKS.setdefault("first_frame", time.time())

    frames = features.num_frames(template.fps)
    result = render_chunk(models, template, features, 0, frames, Path(out), settings, on_frames=first)
    MARKS["segment_done"] = time.time()
    heavy = [
        m
        for m in ("cv2", "diffusers", "transformers", "torch._dynamo", "torch._inductor")
        if m in sys.modules
    ]
    print(
        json.dumps(
            {"marks": MARKS, "frames": frames, "heavy_modules": heavy, "timings": result.timings.to_dict()}
        )
    )


if __name__ == "__main__":
    if len(sys.argv) not in (7, 8):
        sys.exit(__doc__)
    main(*sys.argv[1:])

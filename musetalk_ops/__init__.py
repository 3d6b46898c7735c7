"""MuseTalk v1.5 lip-sync engine: plain Python + torch, never imports Dagster.

One module per stage: ``audio`` (Whisper features), ``models`` (official weights),
``faces``/``masks``/``prepare`` (template preprocessing), ``cache`` (template cache format),
``blend`` (paste-back), ``video`` (H.264/AAC), ``render`` (the chunk API), ``store`` (object storage).
"""

__version__ = "0.1.0"
ENGINE_VERSION = __version__

# Frames per model batch. On an H100 (bench/RESULTS.md, session 3) UNet + VAE ran 269 frames/s at 20 (the
# official realtime default) and 300 at 48 under graphs; compiled 470 / 495 / 496 at 20 / 32 / 48, with
# peak GPU memory 4.4 / 7.8 / 10.0 GB. 32 takes most of the gain and leaves a 24 GB card headroom.
# With the AOT engine on an H200 (session 10), 64 ran UNet + VAE 1.6–2.0 % faster sustained (the UNet
# alone 7 % per frame; the VAE decodes in slices of 32 either way, so memory is the same) but renders a
# 3 s reply 6 % slower (177 vs 188 ms: 128 UNet frames instead of 96): a setting for long renders.
DEFAULT_BATCH_SIZE = 32

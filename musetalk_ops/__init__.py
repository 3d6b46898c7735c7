"""MuseTalk v1.5 lip-sync engine: plain Python + torch, never imports Dagster.

One module per stage: ``audio`` (Whisper features), ``models`` (official weights),
``faces``/``masks``/``prepare`` (template preprocessing), ``cache`` (template cache format),
``blend`` (paste-back), ``video`` (H.264/AAC), ``render`` (the chunk API), ``store`` (object storage).
"""

__version__ = "0.1.0"
ENGINE_VERSION = __version__

# Frames per model batch. On an H100 (bench/RESULTS.md, session 3) UNet + VAE ran 269 frames/s at 20 (the
# official realtime default) and 300 at 48 under graphs; compiled 470 / 495 / 496 at 20 / 32 / 48, with
# peak GPU memory 4.4 / 7.8 / 10.0 GB. With the AOT engine on an H200, 64 runs UNet + VAE 1.5–2.0 %
# faster sustained than 32 (the UNet alone 7 % per frame; the VAE decodes in slices of 32 either way, so
# memory is the same; sessions 10–11), and since the engine runs a chunk's tail of at most 32 frames on a
# UNet of 32 (aot.unet_batches), a 3 s reply renders 2.4 % faster too (170 vs 175 ms; session 11).
DEFAULT_BATCH_SIZE = 64

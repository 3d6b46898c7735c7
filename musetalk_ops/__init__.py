"""MuseTalk v1.5 lip-sync engine: plain Python + torch, never imports Dagster.

One module per stage: ``audio`` (Whisper features), ``models`` (official weights),
``faces``/``masks``/``prepare`` (template preprocessing), ``cache`` (template cache format),
``blend`` (paste-back), ``video`` (H.264/AAC), ``render`` (the chunk API), ``store`` (object storage).
"""

__version__ = "0.1.0"

# Frames per model batch. On an H100 (bench/RESULTS.md, session 3) UNet + VAE ran 269 frames/s at 20 (the
# official realtime default) and 300 at 48 under graphs; compiled 470 / 495 / 496 at 20 / 32 / 48, with
# peak GPU memory 4.4 / 7.8 / 10.0 GB. With the AOT engine on an H200, 64 runs UNet + VAE 1.5–2.1 %
# faster sustained than 32 (the UNet alone 6–7 % per frame; the VAE decodes in slices of 32 either way, so
# memory is the same; sessions 10–11). The engine runs a chunk's tail of at most 32 frames on a UNet of
# 32 (aot.unet_batches), so a 3 s reply (64 + 11 frames) spends 42 ms in the UNet against 46 at batch 32
# (session 11): short replies lose nothing to the larger batch.
DEFAULT_BATCH_SIZE = 64

"""MuseTalk v1.5 lip-sync rendering: plain Python + torch, never imports Dagster.

One module per stage: ``audio`` (Whisper features), ``models`` (official weights),
``faces``/``masks``/``prepare`` (template preprocessing), ``template_cache`` (template cache format),
``blend`` (paste-back), ``video`` (H.264/AAC), ``render`` (the chunk API), ``engine`` (the ahead-of-time
compiled UNet and VAE), ``store`` (object storage).
"""

__version__ = "0.1.0"

# Frames per model batch: the fastest sustained size measured (bench/RESULTS.md); short replies lose
# nothing to it, the engine runs a chunk's tail on a UNet of one decode slice (engine.spec.unet_batches).
DEFAULT_BATCH_SIZE = 64

# The preparation code that made a template cache's latents and masks, named in its manifest and
# fingerprint: bumped whenever the same inputs would be prepared into other numbers, so that old caches
# are never reused. 2: the VAE encoder gets the official contiguous input, one crop at a time.
PREPARATION_VERSION = 2

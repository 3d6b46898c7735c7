"""MuseTalk v1.5 lip-sync engine: plain Python + torch, never imports Dagster.

One module per stage: ``audio`` (Whisper features), ``models`` (official weights),
``faces``/``masks``/``prepare`` (template preprocessing), ``cache`` (template cache format),
``blend`` (paste-back), ``video`` (H.264/AAC), ``render`` (the chunk API), ``store`` (object storage).
"""

__version__ = "0.1.0"
ENGINE_VERSION = __version__

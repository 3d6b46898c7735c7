"""Tests of musetalk_ops (the engine): models, preparation, rendering, video, the store, the CLI."""

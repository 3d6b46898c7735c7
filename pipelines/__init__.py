"""The Dagster code location of musetalk-pipeline (``pipelines.definitions``).

It imports the engine (``musetalk_ops``), never the reverse. ``submit`` and ``stats`` back the
``musetalk submit`` / ``musetalk stats`` subcommands.
"""

"""Benchmarks of the render engine and the pipeline; run from the repository root, e.g.
``python -m bench.render --help``. Scripts: ``render`` (end to end against an official-style baseline),
``probe`` (what bounds a chunk, batch sizes of the AOT engine), ``load_models`` (UNet load times),
``load_test`` (the whole product under ``dagster dev``); ``cold_start`` is the child process of the
render benchmark's cold starts. Results: bench/RESULTS.md.
"""

"""The engine: the UNet and VAE decode compiled ahead of time (AOTInductor), built once per GPU type and
loaded in a fraction of a second.

Why: compiled code runs UNet + VAE about twice as fast as CUDA graphs of the eager models, but
``torch.compile`` costs every fresh process half a minute or more before its first frame, which a short
clip cannot repay. An AOTInductor package holds the compiled kernels and the C++ that launches them; a
process loads it and points it at the weights it has already loaded: no tracing, no compiling, and
``torch._inductor`` is not even imported.

Weights are not in the package (``package_constants_in_so=False``), so one engine serves any weights of
the same architecture (the official ones, demo ones, a fine-tune) and is a few MB. Constants Inductor
derives from weights (transposed or padded copies) are recomputed from the loaded weights when they are
bound (runtime constant folding): without it, such a constant is baked in at build time and a different
set of weights silently gives different outputs (tests load other weights than the engine was built with).

The C++ wrapper of an engine must share the C++ runtime of the process that loads it: a wrapper with its
own static libstdc++ dies of SIGSEGV in its first ``std::regex`` (two copies of libstdc++'s locale
tables). So a build picks the compiler itself (``compiler.engine_compiler``): one whose libstdc++ is the
file this process has mapped. And a new engine is published only after a fresh interpreter has loaded
it, bound weights and run it once (``check.check_step``): a runtime that still crashes leaves no engine
behind, and renders keep to the ``graphs`` path instead of crashing.

An engine is a few packages, one per step and batch size ("part"), each built, checked and stored on
its own: the VAE decode at its slice of the render batch (``vae.decode_slices``: at most 32 frames), and
the UNet at the render batch and, where that is larger, at the slice too (``spec.unet_batches``: 64 → 32
and 64), so that a chunk's last batch which one slice holds runs a UNet of that size instead of a whole
padded batch. Engines for 32 and 64 so share the decode and the UNet at 32. A part is valid for one GPU
type, torch/CUDA version, dtype, batch size and model structure; ``spec.StepSpec.key`` names all of
them, and the package lives in ``<root>/<key>/`` (``engine.json`` last, the directory renamed into
place, so a half-built one is never found). ``root`` defaults to ``$MUSETALK_CACHE/engines``. A render
on CUDA runs the engine for its GPU and batch size wherever all its parts are there
(``render.chunks.resolve_mode``); it never builds one unasked. k8s/engine.yaml builds it on the GPU node.

Modules: ``compiler`` (the C++ compiler of a build), ``spec`` (what a part depends on, where it is
stored), ``steps`` (the modules compiled), ``runner`` (loading a package and binding weights),
``build``, ``check`` (the fresh-process check), ``load`` (an engine ready to call).
"""

"""The chunk API: (template, audio features, frame range, settings) → encoded H.264 segment + timings.

This is the one render path: the CLI renders one chunk covering every frame (``file``), the Dagster
job fans chunks out over GPUs and joins the segments (``chunks``). Per batch: UNet at timestep 0 → VAE
decode → paste-back with the cached masks → encode. Two ways to run it, producing the same frames:

* ``reference`` (the default on the CPU, what CI tests): faces go to the host and are pasted with
  ``blend.paste_face`` (OpenCV + numpy) on one worker thread that also encodes, overlapping the next
  batch's model work.
* the fast path (``fast``; on CUDA by default ``aot`` where an engine was built for the GPU and batch
  size, else ``graphs``; also ``eager`` and ``compiled``, see ``generator.py``): batches padded to
  fixed bucket shapes, the face region resized and blended on the device (``device_paste.py``,
  bit-identical integer arithmetic), the block of the frame that changed converted to YUV 4:2:0 there
  too (``yuv.py``, within one level of swscale) and only that copied back through pinned memory
  (``patches``); the chunk's frames are encoded as several sub-segments on parallel threads
  (``encoders``: x264 on the CPU is the bottleneck without NVENC) that are joined by remuxing into the
  one chunk segment. The model thread never waits for the GPU: stage times come from CUDA events.

Stage seconds are busy time per stage (overlapping stages can sum to more than ``total``, which is
wall time). This package file imports nothing, so that ``settings`` loads without torch.
"""

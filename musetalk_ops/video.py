"""H.264 segments, remux-only merge with AAC, and a decoding probe (PyAV; no ffmpeg binary).

Each render chunk writes one MP4 segment. Segments are made to be *joined by remuxing*: every
segment starts on an IDR frame (x264 opens with one; GOPs are closed), carries SPS/PPS in band
(``repeat-headers``) as well as in ``avcC``, and uses the same encoder settings, so `mux` copies their
packets into one file with continuous timestamps and never re-encodes video. Audio is encoded to AAC
from the original request file, trimmed to the video length.

Colour: frames are RGB uint8, converted to yuv420p by swscale (PyAV ``reformat``) with the BT.709
matrix and limited ("tv") range requested explicitly (PyAV's default would be BT.601), or arrive
already converted the same way (``write_yuv``, from ``yuv.py`` on the GPU). The
stream is tagged bt709/bt709/bt709/tv to match, in the H.264 VUI and the MP4 ``colr`` box.
"""

import contextlib
import heapq
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.frame import VideoFrame
from av.video.reformatter import ColorPrimaries, ColorTrc, Interpolation

from musetalk_ops.errors import InputError
from musetalk_ops.files import atomic_path, temp_path

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
GOP_SECONDS = 2  # an IDR every 2 s: seekable output, and short enough for streaming segments later
# P-frames only. Without x264's default of 3 B-frames it needs 40 % less CPU per frame on the large frames
# that bound a chunk without NVENC, and on the frames a render makes they buy few bytes or none. One x264
# thread, veryfast crf 18 (``bench/probe.py --quick --sections bframes``, 2-core VM): 1080p with sensor
# noise 26.0 → 15.7 ms/frame and 6.49 → 5.66 KB/frame; the same panning 33.2 → 20.0 ms, 7.50 → 7.65 KB;
# a 512² still whose mouth moves 1.5 → 1.8 ms, 1.62 → 1.94 KB (cheap either way); PSNR within 0.04 dB.
# On an H200 host's 16 CPUs, 4 segments of the bench's 1080p template at once: 229.9 → 299.9 frames/s,
# 20.1 → 22.1 KB/frame, PSNR 47.09 → 47.22 dB (bench/RESULTS.md, session 6). P-only streams also
# decode with no reordering delay.
BFRAMES = 0
AUDIO_BITRATE_PER_CHANNEL = 64_000  # 128 kb/s stereo
AUDIO_FALLBACK_RATE = 48_000
_BT709 = 1  # AVCOL_PRI_BT709 == AVCOL_TRC_BT709 == AVCOL_SPC_BT709
_RANGE_TV = 1  # AVCOL_RANGE_MPEG
_COLORSPACES = {0: "rgb", 1: "bt709", 2: "unspecified", 5: "bt470bg", 6: "smpte170m", 9: "bt2020nc"}
_RANGES = {0: "unspecified", 1: "tv", 2: "pc"}
_SWS_FLAGS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND


def fps_fraction(fps: float) -> Fraction:
    """Exact frame rate: integers stay integers, NTSC rates (29.97, 23.976, 59.94) become n·1000/1001."""
    value = float(fps)
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"fps must be a positive number, got {fps!r}")
    if abs(value - round(value)) < 1e-6:
        return Fraction(round(value))
    ntsc = Fraction(round(value * 1.001) * 1000, 1001)
    if abs(value - ntsc) < 5e-4 * value:
        return ntsc
    return Fraction(value).limit_denominator(1001)


class SegmentWriter:
    """Context manager writing RGB frames as one independently decodable H.264 MP4 segment.

    Frames are encoded as they arrive (no frame buffer); PyAV releases the GIL in swscale and in the
    encoder, so a caller may run `write` on a background thread while the GPU works on the next batch.
    x264 picks its own thread count from the CPU count unless ``threads`` is given (parallel writers
    share the CPUs), and writes P-frames only unless ``bframes`` asks for B-frames (``BFRAMES``). The
    file appears at ``path`` only on a clean exit; on an exception the temporary file is removed.

    H.264 4:2:0 can only crop in 2-pixel steps, so an odd width/height is padded by one replicated edge
    row/column and the segment (and the merged video) has the even ``coded_size``; ``size`` keeps the
    requested one.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        width: int,
        height: int,
        crf: int = 18,
        preset: str = "veryfast",
        threads: int = 0,
        bframes: int = BFRAMES,
    ) -> None:
        if width < 1 or height < 1:
            raise InputError(f"{path}: frame size must be positive, got {width}x{height}")
        if not 0 <= crf <= 51:
            raise InputError(f"crf must be in 0..51, got {crf}")
        if preset not in PRESETS:
            raise InputError(f"unknown x264 preset {preset!r}: use one of {', '.join(PRESETS)}")
        if threads < 0:
            raise InputError(f"encoder threads must be 0 (x264 decides) or more, got {threads}")
        if not 0 <= bframes <= 16:
            raise InputError(f"B-frames must be in 0..16, got {bframes}")
        self.threads, self.bframes = threads, bframes
        self.path = Path(path)
        self.fps = fps_fraction(fps)
        self.size = (width, height)
        self.coded_size = (width + width % 2, height + height % 2)
        self.crf = crf
        self.preset = preset
        self.frames = 0
        self._tmp: Path | None = None
        self._container: av.container.OutputContainer | None = None

    def __enter__(self) -> "SegmentWriter":
        self._tmp = temp_path(self.path)
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4")
            self._stream = self._add_stream(self._container)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return self

    def _add_stream(self, container: av.container.OutputContainer) -> av.video.stream.VideoStream:
        stream = container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = self.coded_size
        stream.pix_fmt = "yuv420p"
        cc = stream.codec_context
        cc.color_primaries = cc.color_trc = cc.colorspace = _BT709
        cc.color_range = _RANGE_TV
        cc.thread_type = "AUTO"  # libx264: frame threads (SLICE would switch x264 to sliced threads)
        cc.thread_count = self.threads  # 0: x264 sizes it to the machine (1.5 threads per CPU)
        keyint = max(1, round(self.fps * GOP_SECONDS))
        cc.options = {
            "crf": str(self.crf),
            "preset": self.preset,
            # closed GOPs; SPS/PPS in band although the MP4 muxer's global header would turn that off
            "x264-params": f"keyint={keyint}:open-gop=0:repeat-headers=1:bframes={self.bframes}",
        }
        return stream

    def write(self, frames: np.ndarray) -> None:
        """Encode ``frames`` (uint8 RGB ``[n,H,W,3]`` or ``[H,W,3]``) now, in order."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        width, height = self.size
        if frames.dtype != np.uint8 or frames.shape[1:] != (height, width, 3):
            raise ValueError(
                f"expected uint8 [n,{height},{width},3] RGB frames, got {frames.dtype} {list(frames.shape)}"
            )
        if self.coded_size != self.size:
            frames = np.pad(
                frames,
                ((0, 0), (0, self.coded_size[1] - height), (0, self.coded_size[0] - width), (0, 0)),
                mode="edge",
            )
        frames = np.ascontiguousarray(frames)
        for rgb in frames:
            self._encode(
                VideoFrame.from_numpy_buffer(rgb, format="rgb24").reformat(
                    format="yuv420p",
                    dst_colorspace="itu709",
                    dst_color_range="MPEG",
                    interpolation=_SWS_FLAGS,
                )
            )

    def write_yuv(self, frame: np.ndarray) -> None:
        """Encode one frame already in YUV 4:2:0, BT.709 limited range (``yuv.py``), packed as
        ``[H·3/2, W]`` at the even ``coded_size``: no conversion on the encoder's thread."""
        width, height = self.coded_size
        if frame.dtype != np.uint8 or frame.shape != (height * 3 // 2, width):
            raise ValueError(
                f"expected uint8 [{height * 3 // 2},{width}] packed YUV 4:2:0, "
                f"got {frame.dtype} {list(frame.shape)}"
            )
        self._encode(VideoFrame.from_ndarray(frame, format="yuv420p"))

    def _encode(self, frame: VideoFrame) -> None:
        if self._container is None:
            raise RuntimeError("SegmentWriter used outside its `with` block")
        frame.pts = self.frames
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        container, tmp = self._container, self._tmp
        self._container = None
        try:
            if exc_type is None:
                if self.frames == 0:
                    raise ValueError(f"{self.path}: no frames were written")
                container.mux(self._stream.encode(None))
                container.close()
                os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(Exception):  # a failure is already propagating; report that one
                container.close()
            tmp.unlink(missing_ok=True)


def mux(segments: list[Path], audio: Path | None, out: Path, *, comment: str) -> None:
    """Join H.264 segments by copying their packets, add AAC from ``audio``, write ``out`` atomically.

    Timestamps are rewritten to run on continuously; the audio is cut at the video's end (it is
    floor(seconds × fps) frames, so the speech normally outlasts it by under a frame). The file is
    ``+faststart`` (moov before mdat) and carries ``comment`` as its comment tag. Packets of both
    tracks are interleaved by time so that the file plays while it downloads.
    """
    segments = [Path(s) for s in segments]
    if not segments:
        raise ValueError("mux: no segments")
    out = Path(out)
    seconds, delay = _check_segments(segments)
    with atomic_path(out) as tmp, contextlib.ExitStack() as stack:
        container = stack.enter_context(
            av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"})
        )
        container.metadata["comment"] = comment
        with av.open(str(segments[0])) as first:
            video = container.add_stream_from_template(first.streams.video[0])  # codec, time base
        tracks = [_segment_packets(segments, video, delay)]
        if audio is not None:
            source = stack.enter_context(_open_input(Path(audio), "audio"))
            tracks.append(_add_aac_track(container, source, seconds))
        for packet in heapq.merge(*tracks, key=_packet_time):
            container.mux(packet)


def _check_segments(segments: list[Path]) -> tuple[Fraction, int]:
    """Total video duration in seconds and the largest decode delay (first pts − first dts, in ticks).

    Segments must agree on every parameter the remux keeps. Their decode delays can differ: the MP4
    muxer derives it from the B-frames actually present, and a segment of 1–2 frames has none.
    """
    first, seconds, delay = None, Fraction(0), 0
    for path in segments:
        with _open_input(path, "segment") as container:
            if not container.streams.video:
                raise InputError(f"segment {path}: no video stream")
            stream = container.streams.video[0]
            cc = stream.codec_context
            params = (
                cc.name,
                cc.width,
                cc.height,
                cc.format.name,
                bytes(cc.extradata or b""),
                stream.time_base,
                stream.average_rate,
            )
            if first is None:
                first = params
            elif params != first:
                raise InputError(
                    f"segment {path}: encoder settings differ from {segments[0]} "
                    "(segments must come from identical SegmentWriter settings)"
                )
            packets = [p for p in container.demux(stream) if p.size]
            if not packets:
                raise InputError(f"segment {path}: no video frames")
            seconds += sum(p.duration for p in packets) * stream.time_base
            delay = max(delay, packets[0].pts - packets[0].dts)
    return seconds, delay


def _segment_packets(
    segments: list[Path], out_stream: av.video.stream.VideoStream, delay: int
) -> Iterator[av.Packet]:
    """The segments' video packets, shifted so that each segment starts where the previous one ended.

    Presentation times continue from the previous segment's end; decode times start ``delay`` ticks
    before that for every segment, so they increase across joins and never pass the presentation time.
    """
    offset = 0
    for path in segments:
        with av.open(str(path)) as segment:
            stream = segment.streams.video[0]
            origin = first_dts = None
            end = offset
            for packet in segment.demux(stream):
                if not packet.size:
                    continue
                if origin is None:  # the IDR frame: first in decode and in presentation order
                    origin, first_dts = packet.pts, packet.dts
                packet.pts += offset - origin
                packet.dts += offset - delay - first_dts
                end = max(end, packet.pts + packet.duration)
                packet.stream = out_stream
                yield packet
            offset = end


def _add_aac_track(
    container: av.container.OutputContainer, source: av.container.InputContainer, seconds: Fraction
) -> Iterator[av.Packet]:
    """Add an AAC track for ``source``'s first audio stream; yield its packets, cut at ``seconds``.

    Mono stays mono, anything else becomes stereo; the sample rate is kept when AAC has it, else 48 kHz.
    """
    if not source.streams.audio:
        raise InputError(f"audio {source.name}: no audio stream")
    in_stream = source.streams.audio[0]
    rate = in_stream.rate if in_stream.rate in av.Codec("aac", "w").audio_rates else AUDIO_FALLBACK_RATE
    channels = 1 if in_stream.channels == 1 else 2
    layout = "mono" if channels == 1 else "stereo"
    stream = container.add_stream("aac", rate=rate, layout=layout)
    # AAC carries at most 6144 bits per channel per 1024 samples: cap the rate for low sample rates
    stream.bit_rate = channels * min(AUDIO_BITRATE_PER_CHANNEL, 6 * rate)
    return _encode_audio(source, in_stream, stream, math.floor(seconds * rate))


def _encode_audio(
    source: av.container.InputContainer,
    in_stream: av.audio.stream.AudioStream,
    stream: av.audio.stream.AudioStream,
    limit: int,
) -> Iterator[av.Packet]:
    """Decode, resample to planar float, cut after ``limit`` samples, encode; the encoder rechunks."""
    resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
    done = 0
    try:
        for frame in itertools.chain(source.decode(in_stream), [None]):  # None flushes the resampler
            for chunk in resampler.resample(frame):
                if done < limit:
                    chunk = _head(chunk, limit - done)
                    chunk.pts, chunk.time_base = done, Fraction(1, stream.rate)
                    done += chunk.samples
                    yield from stream.encode(chunk)
            if done >= limit:
                break
    except av.error.FFmpegError as error:
        raise InputError(f"audio {source.name}: cannot decode ({error})") from None
    if done == 0:
        raise InputError(f"audio {source.name}: no audio samples")
    yield from stream.encode(None)


def _head(frame: av.AudioFrame, samples: int) -> av.AudioFrame:
    """The first ``samples`` samples of a planar float frame (the frame itself when it is short enough)."""
    if frame.samples <= samples:
        return frame
    head = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(frame.to_ndarray()[:, :samples]), format="fltp", layout=frame.layout.name
    )
    head.sample_rate = frame.sample_rate
    return head


def _packet_time(packet: av.Packet) -> Fraction:
    return packet.dts * packet.time_base


def _open_input(path: Path, what: str) -> av.container.InputContainer:
    """Open a media file for reading; a missing or unreadable file is the user's input error."""
    if not path.is_file():
        raise InputError(f"{what} {path}: file not found")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as error:
        raise InputError(f"{what} {path}: cannot read ({error})") from None


@dataclass(frozen=True)
class VideoInfo:
    """What a player would see: decoded frame count, stream parameters, tags."""

    width: int
    height: int
    fps: float
    frames: int  # decoded, not the container's claim
    duration: float  # video track, seconds
    video_codec: str
    pix_fmt: str
    audio_codec: str | None
    audio_duration: float | None  # audio track as the container presents it (AAC priming/padding cut)
    audio_sample_rate: int | None
    audio_channels: int | None
    comment: str | None
    color_primaries: str
    color_trc: str
    colorspace: str
    color_range: str
    keyframe_at_start: bool


def probe(path: str | os.PathLike) -> VideoInfo:
    """Inspect ``path``, decoding the whole video track to count frames.

    Durations come from the packets' timestamps (presentation start, or 0 where AAC priming starts
    earlier, to end), exact in the stream's time base: the MP4 header rounds to 1 ms.
    """
    path = Path(path)
    with _open_input(path, "video") as container:
        if not container.streams.video:
            raise InputError(f"video {path}: no video stream")
        video = container.streams.video[0]
        video.thread_type = "AUTO"
        audio = container.streams.audio[0] if container.streams.audio else None
        spans: dict[int, tuple[int, int]] = {}
        frames, packet_key, frame_key = 0, None, False
        try:
            for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                if packet.size and packet.pts is not None:
                    start, end = packet.pts, packet.pts + packet.duration
                    old = spans.get(packet.stream.index, (start, end))
                    spans[packet.stream.index] = (min(old[0], start), max(old[1], end))
                if packet.stream is video:  # empty packets too: they flush the decoder
                    packet_key = packet.is_keyframe if packet_key is None and packet.size else packet_key
                    for frame in packet.decode():
                        frame_key = frame_key or (frames == 0 and frame.key_frame)
                        frames += 1
        except av.error.FFmpegError as error:
            raise InputError(f"video {path}: cannot decode ({error})") from None
        cc = video.codec_context
        return VideoInfo(
            width=cc.width,
            height=cc.height,
            fps=float(video.average_rate or video.guessed_rate or 0),
            frames=frames,
            duration=_seconds(video, spans),
            video_codec=cc.name,
            pix_fmt=cc.format.name if cc.format else "",
            audio_codec=audio.codec_context.name if audio else None,
            audio_duration=_seconds(audio, spans) if audio else None,
            audio_sample_rate=audio.rate if audio else None,
            audio_channels=audio.channels if audio else None,
            comment=container.metadata.get("comment"),
            color_primaries=_enum_name(ColorPrimaries, cc.color_primaries),
            color_trc=_enum_name(ColorTrc, cc.color_trc),
            colorspace=_COLORSPACES.get(cc.colorspace, str(cc.colorspace)),
            color_range=_RANGES.get(cc.color_range, str(cc.color_range)),
            keyframe_at_start=bool(packet_key and frame_key),
        )


def _seconds(stream: av.stream.Stream, spans: dict[int, tuple[int, int]]) -> float:
    if stream.index not in spans:
        return float((stream.duration or 0) * stream.time_base)
    start, end = spans[stream.index]
    return float((end - max(start, 0)) * stream.time_base)


def _enum_name(enum, value: int) -> str:
    try:
        return enum(value).name.lower()
    except ValueError:
        return str(value)

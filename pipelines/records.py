"""What the ``render_video`` ops hand each other: small frozen records (keys, ranges, seconds).

They travel through the IO manager (pickled beside the store), so each op can run in its own process
or pod; frames and features travel as objects in the store (``work/<id>/``).
"""

from dataclasses import asdict, dataclass

from musetalk_ops.template_store import CacheRef


@dataclass(frozen=True)
class Request:
    """A validated render request with the template cache it renders from."""

    id: str
    template: str
    audio: str  # the audio object's key
    options: dict
    cache: CacheRef
    version: str  # MuseTalk version of the template cache
    weights: str  # the fingerprint of the weights the cache was prepared with, or "demo"
    fps: float


@dataclass(frozen=True)
class Features:
    """The request's audio features in the store and what computing them cost."""

    key: str
    frames: int
    video_seconds: float
    audio_features: float  # seconds
    load: float  # seconds loading the audio model


@dataclass(frozen=True)
class Chunk:
    """Frames ``[start, stop)`` of a request, rendered by one ``render_chunk`` step."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class RenderedChunk:
    """A chunk's H.264 segment in the store; its JSON (``to_json``) is the done marker beside it."""

    chunk: Chunk
    key: str
    fingerprint: str
    timings: dict
    reused: bool = False  # rendered by an earlier attempt of the step

    def to_json(self) -> dict:
        return {
            **asdict(self.chunk),
            "key": self.key,
            "fingerprint": self.fingerprint,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict, reused: bool) -> "RenderedChunk":
        chunk = Chunk(data["index"], data["start"], data["stop"])
        return cls(chunk, data["key"], data["fingerprint"], data["timings"], reused)

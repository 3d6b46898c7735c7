"""A warm render worker: models loaded once, batch buckets warmed, template caches resident, one
render at a time on its device behind a bounded queue.

A reply goes: queue → template (pointer → resident copy, else download and read) → audio decode →
Whisper → claim the id → render every frame as one chunk → mux → store writes (audio, video, then the
record). Everything a user can get wrong is checked before the claim, so a refused request writes
nothing; once claimed, a render ends with its record or with a failure record.
"""

import contextlib
import dataclasses
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from musetalk_ops import keys
from musetalk_ops.config import Limits
from musetalk_ops.credentials import configured_identity
from musetalk_ops.errors import CacheError, InputError, MuseTalkError
from musetalk_ops.ids import ID_PATTERN, validate_id
from musetalk_ops.options import OPTIONS, check_request_options
from musetalk_ops.render.settings import RenderSettings
from musetalk_ops.render_records import (
    claim_id,
    read_records,
    render_record,
    taken_by,
    write_failure,
    write_render_record,
)
from musetalk_ops.store import Store
from musetalk_ops.template_store import CacheRef, current_cache, local_cache, prepared_templates
from musetalk_ops.timings import Timings

INTERRUPTED = "interrupted: the worker stopped while rendering"
SHUTTING_DOWN = "the worker is shutting down: send the request to another worker"

log = logging.getLogger(__name__)


class IdTaken(InputError):
    """The request id is already used by a render, a request or a run (HTTP 409)."""


class QueueFull(MuseTalkError):
    """The worker's queue is full (HTTP 429): try again shortly or another worker."""


class Draining(MuseTalkError):
    """The worker is shutting down (HTTP 503): it finishes what it has and takes nothing new."""


@dataclass
class Reply:
    """One direct render. Its audio is the object ``audio_key``; an upload (``audio_file``) is written
    there with the video, otherwise the object is read from the store."""

    id: str
    template: str
    options: dict
    audio_key: str
    audio_file: Path | None = None
    received: float = dataclasses.field(default_factory=time.perf_counter)


def check_options(options: object, settings: RenderSettings) -> dict:
    """A request's options, validated as everywhere, refusing those this warm worker cannot honour
    without rebuilding its models or buckets (``Option.warm_fixed``) unless they equal its own."""
    options = check_request_options(options)
    for name, value in options.items():
        if OPTIONS[name].warm_fixed and value != getattr(settings, name):
            raise InputError(
                f"option {name}={value!r}: this worker renders with {name}={getattr(settings, name)!r} "
                f"and cannot change it without rebuilding; leave it out or use a worker started with it"
            )
    return options


class ResidentTemplates:
    """Loaded templates, most recently used first, within a memory budget (at least one stays)."""

    def __init__(self, store: Store, budget_bytes: int, version: str) -> None:
        self.store, self.budget, self.version = store, budget_bytes, version
        self._loaded: OrderedDict[str, tuple[CacheRef, object, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return sum(size for _ref, _template, size in self._loaded.values())

    def __len__(self) -> int:
        return len(self._loaded)

    def get(self, tid: str, timings: Timings | None = None):
        """The template of ``tid``'s current cache: resident, else downloaded (``store`` seconds) and read
        (``load`` seconds); a cache the store no longer names current is replaced."""
        from musetalk_ops.template_cache import read_cache

        start = time.perf_counter()
        ref = current_cache(self.store, validate_id(tid, "template id"))
        with self._lock:
            found = self._loaded.get(tid)
            if found is not None and found[0] == ref:
                self._loaded.move_to_end(tid, last=False)
                _add(timings, "store", time.perf_counter() - start)
                return found[1]
        path = local_cache(self.store, ref)
        loaded = time.perf_counter()
        template = read_cache(path)
        if template.version != self.version:
            raise InputError(
                f"template {tid} was prepared for MuseTalk {template.version}; "
                f"this worker serves {self.version}"
            )
        size = template.frames.nbytes + template.latents.numel() * template.latents.element_size()
        size += sum(m.nbytes for m in template.masks if m is not None)
        with self._lock:
            self._loaded[tid] = (ref, template, size)
            self._loaded.move_to_end(tid, last=False)
            while len(self._loaded) > 1 and self.bytes > self.budget:
                self._loaded.popitem(last=True)
        _add(timings, "store", loaded - start)
        _add(timings, "load", time.perf_counter() - loaded)
        return template


def _add(timings: Timings | None, stage: str, seconds: float) -> None:
    if timings is not None:
        timings.add(stage, seconds)


class Worker:
    """Renders replies one at a time on its device; ``submit`` queues, the caller waits on the future."""

    def __init__(
        self,
        store: Store,
        settings: RenderSettings,
        *,
        name: str,
        queue_limit: int = 16,
        template_budget_bytes: int = 2 << 30,
        limits: Limits | None = None,
    ) -> None:
        self.store, self.settings, self.name = store, settings, name
        self.queue_limit = queue_limit
        self.limits = limits or Limits.from_env()
        self.version = settings.version or "v15"
        self.templates = ResidentTemplates(store, template_budget_bytes, self.version)
        self.models = None
        self.ready = False
        self.draining = False
        self.on_outcome: Callable[[str, dict], None] | None = None  # hears ("done" | "failed", record)
        self.started = time.time()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="musetalk-render")
        self._state = threading.Condition()
        self._active: dict[str, str] = {}  # request id → "queued" | "rendering"

    def start(self, preload: list[str] | None = None) -> dict:
        """Load the models, record renders a previous process of this worker left unfinished, load the
        ``preload`` templates (None: every prepared one) and warm every bucket; returns start seconds."""
        from musetalk_ops.render.models import load_render_models
        from musetalk_ops.render.warm import warm_up

        begin = time.perf_counter()
        configured_identity()  # a half-configured signing identity stops the start, not every reply
        self.models = load_render_models(self.settings, version=self.version)
        loaded = time.perf_counter()
        interrupted = self.record_interrupted()
        ids = prepared_templates(self.store) if preload is None else preload
        first = None
        for tid in ids:
            try:
                template = self.templates.get(tid)
            except (InputError, CacheError) as e:
                if preload is not None:  # a template the user named must load
                    raise
                log.warning(f"not preloading template {tid}: {e}")
                continue
            first = first or template
        templates = time.perf_counter()
        warm = warm_up(self.models, self.settings, first)
        self.ready = True
        return {
            "models": round(loaded - begin, 3),
            "templates": round(templates - loaded, 3),
            "warm_up": round(warm, 3),
            "preloaded": len(ids),
            "interrupted": interrupted,
        }

    def record_interrupted(self) -> int:
        """Failure records for ids this worker claimed but never finished (it was killed mid-render)."""
        count = 0
        for claim in read_records(self.store, keys.CLAIMS):
            rid = claim.get("id")
            mine = claim.get("by") == "worker" and claim.get("worker") == self.name
            if not (mine and isinstance(rid, str) and ID_PATTERN.fullmatch(rid)):
                continue
            if not (
                self.store.exists(keys.render_timings(rid)) or self.store.exists(keys.failed_render(rid))
            ):
                write_failure(
                    self.store, rid, template=claim.get("template", ""), error=INTERRUPTED, worker=self.name
                )
                count += 1
        return count

    @property
    def pending(self) -> int:
        with self._state:
            return len(self._active)

    def status(self, rid: str) -> str | None:
        with self._state:
            return self._active.get(rid)

    def submit(self, reply: Reply) -> Future:
        """Queue ``reply``; refuses a taken id (IdTaken), a full queue (QueueFull), and all while draining."""
        if self.draining:
            raise Draining(SHUTTING_DOWN)
        if not self.ready:
            raise Draining("the worker is still starting: try again when /readyz answers 200")
        what = taken_by(self.store, reply.id)
        with self._state:
            if reply.id in self._active:
                what = "a render in progress"
            if what is not None:
                raise IdTaken(f"request id {reply.id!r} is already used by {what}: ids are never reused")
            if len(self._active) >= self.queue_limit:
                raise QueueFull(f"the render queue is full ({self.queue_limit} replies): try again shortly")
            self._active[reply.id] = "queued"
        try:
            return self._executor.submit(self._render, reply)
        except RuntimeError:  # the executor was shut down under us
            self._done(reply.id)
            raise Draining(SHUTTING_DOWN) from None

    def drain(self) -> None:
        """Take no new replies; those queued and rendering finish."""
        self.draining = True

    def abandon(self) -> None:
        """Drop the queued replies (their clients see the connection close); the one rendering ends with
        the process, and the restart of this worker records it as failed."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._state:
            return self._state.wait_for(lambda: not self._active, timeout)

    def _done(self, rid: str) -> None:
        with self._state:
            self._active.pop(rid, None)
            self._state.notify_all()

    def _render(self, reply: Reply) -> dict:
        try:
            with self._state:
                self._active[reply.id] = "rendering"
            return self._render_reply(reply)
        finally:
            self._done(reply.id)

    def _render_reply(self, reply: Reply) -> dict:
        from musetalk_ops.audio import extract_features, load_audio
        from musetalk_ops.video import fps_fraction

        before = Timings()  # the stages before the render: queue, store, load, audio_features
        before.add("queue", time.perf_counter() - reply.received)
        with tempfile.TemporaryDirectory(prefix="musetalk-reply-") as tmp:
            template = self.templates.get(reply.template, before)
            audio = reply.audio_file
            if audio is None:
                start = time.perf_counter()
                audio = Path(tmp) / Path(reply.audio_key).name
                self.store.get_file(reply.audio_key, audio)
                before.add("store", time.perf_counter() - start)
            try:  # the same checks as the CLI and the request sensor; messages name the request's audio
                wav = load_audio(audio, self.limits)
            except InputError as e:
                raise InputError(str(e).replace(str(audio), f"audio of request {reply.id}")) from None
            with before.stage("audio_features", self.models.device):
                features = extract_features(self.models.whisper, wav)
            settings = dataclasses.replace(self.settings, **reply.options)
            fps = fps_fraction(settings.fps or template.fps)
            if features.num_frames(fps) == 0:
                raise InputError(f"the audio is shorter than one video frame at {float(fps):g} fps")
            if not claim_id(self.store, reply.id, "worker", worker=self.name, template=reply.template):
                raise IdTaken(f"request id {reply.id!r} was taken while it waited: ids are never reused")
            try:
                record = self._publish(reply, template, features, audio, settings, before, Path(tmp))
            except BaseException as e:
                self._record_failure(reply, e)
                raise
        self._tell("done", record)
        return record

    def _tell(self, outcome: str, record: dict) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome, record)

    def _publish(
        self, reply: Reply, template, features, audio: Path, settings, before: Timings, tmp: Path
    ) -> dict:
        """Render, then write the audio (an upload), the video and last the record."""
        from musetalk_ops.render.file import render_clip

        out = tmp / "out.mp4"
        timings = render_clip(self.models, template, features, audio, out, settings, request=reply.id)
        timings.merge(before)
        identity = configured_identity()  # the one render_clip signed with, if any
        start = time.perf_counter()
        if reply.audio_file is not None:
            self.store.put_file(reply.audio_key, audio)
        self.store.put_file(keys.render_video(reply.id), out)
        timings.add("store", time.perf_counter() - start)
        timings.total = time.perf_counter() - reply.received
        record = render_record(
            timings,
            rid=reply.id,
            template=reply.template,
            fingerprint=template.fingerprint,
            source="worker",
            signer=identity.subject if identity else None,
            worker=self.name,
            audio=reply.audio_key,
        )
        write_render_record(self.store, record)
        return record

    def _record_failure(self, reply: Reply, error: BaseException) -> None:
        message = str(error) if isinstance(error, MuseTalkError) else f"{type(error).__name__}: {error}"
        self._tell("failed", {"id": reply.id, "template": reply.template, "error": message})
        # With the store down, the claim without a record is found at the worker's next start.
        with contextlib.suppress(MuseTalkError):
            write_failure(self.store, reply.id, template=reply.template, error=message, worker=self.name)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

"""The worker's HTTP API (README "Warm render workers"): health, readiness, metrics and direct renders.

Every error is JSON ``{"error": "<one line>"}``: a user mistake is a 4xx (400 bad input, 401 token,
404 unknown id, 409 id taken, 413 body too large, 415 content type, 422 damaged template cache, 429 queue
full, with ``Retry-After``), a worker that cannot render now is a 503, a bug is a 500.
"""

import asyncio
import json
import logging
import math
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from musetalk_ops import __version__, keys
from musetalk_ops.errors import (
    CacheError,
    GpuMemoryError,
    InputError,
    ModelFilesError,
    MuseTalkError,
    StoreError,
)
from musetalk_ops.ids import new_request_id, validate_id
from musetalk_ops.serve.metrics import Metrics
from musetalk_ops.serve.worker import Draining, IdTaken, QueueFull, Reply, Worker, check_options


class UnsupportedMedia(InputError):
    def __init__(self) -> None:
        super().__init__(
            "send multipart/form-data (template, audio file) or application/json (template, audio key)"
        )


# Status codes of the engine's errors; the most specific class first.
STATUS = (
    (IdTaken, 409),
    (UnsupportedMedia, 415),
    (QueueFull, 429),
    (CacheError, 422),
    (InputError, 400),
    (Draining, 503),
    (StoreError, 503),
    (GpuMemoryError, 503),
    (ModelFilesError, 503),
    (MuseTalkError, 500),
)
log = logging.getLogger(__name__)
RENDER_BODY = {  # the two request bodies of POST /v1/renders, for /openapi.json
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["template", "audio"],
                "properties": {
                    "template": {"type": "string", "description": "template id"},
                    "audio": {
                        "type": "string",
                        "format": "binary",
                        "description": "wav, flac, mp3, m4a, aac, ogg",
                    },
                    "id": {"type": "string", "description": "request id (default: r<UTC time>-<random>)"},
                    "options": {"type": "string", "description": "JSON object of request options"},
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["template", "audio"],
                "properties": {
                    "template": {"type": "string"},
                    "audio": {"type": "string", "description": "an audio/<name>.<ext> object in the store"},
                    "id": {"type": "string"},
                    "options": {"type": "object"},
                },
            }
        },
    },
}


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over ``max_bytes``: at once from Content-Length, else while it is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error(413, self._message())(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body over the {self.max_bytes} byte limit (MUSETALK_MAX_UPLOAD_BYTES)"


class RequestMetrics:
    """Counts every HTTP answer by endpoint (the route's path template) and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(worker: Worker, *, token: str | None = None) -> FastAPI:
    """The API over ``worker``; with ``token``, every endpoint but health and readiness needs
    ``Authorization: Bearer <token>``."""
    app = FastAPI(
        title="MuseTalk render worker",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    metrics = Metrics(worker)
    worker.on_outcome = metrics.observe
    recent: list[float] = []  # total seconds of the last renders, for Retry-After

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise _Unauthorized()

    @app.exception_handler(MuseTalkError)
    async def engine_error(_request: Request, error: MuseTalkError) -> JSONResponse:
        status = next(code for kind, code in STATUS if isinstance(error, kind))
        headers = None
        if isinstance(error, QueueFull):
            typical = sorted(recent)[len(recent) // 2] if recent else 1.0
            headers = {"Retry-After": str(max(1, math.ceil(typical * worker.pending / 2)))}
        return _error(status, str(error), headers)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_request: Request, _error_: Exception) -> JSONResponse:
        return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request: Request, error: BodyTooLarge) -> JSONResponse:
        return _error(413, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"msg": "invalid request"}
        return _error(400, f"{'.'.join(map(str, first.get('loc', ())))}: {first['msg']}")

    @app.exception_handler(Exception)
    async def bug(_request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")  # the details stay in the worker's log
        return _error(500, f"internal error ({type(error).__name__}): see the worker's log")

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Models loaded and warmed (200), else 503")
    async def readyz():
        if worker.draining:
            return _error(503, "draining: the worker is shutting down")
        if not worker.ready:
            return _error(503, "starting: loading and warming the models")
        return {"status": "ready", "device": str(worker.models.device), "templates": len(worker.templates)}

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(authorized)])
    async def metrics_text() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post(
        "/v1/renders",
        summary="Render a whole reply on this worker",
        dependencies=[Depends(authorized)],
        openapi_extra={"requestBody": RENDER_BODY},
    )
    async def create_render(request: Request) -> dict:
        tmp = Path(tempfile.mkdtemp(prefix="musetalk-upload-"))
        try:
            reply = await _read_reply(request, tmp, worker)
            future = await asyncio.to_thread(worker.submit, reply)  # store reads: off the event loop
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The upload lives until the render ends, even if this client goes away first.
        future.add_done_callback(lambda _f: shutil.rmtree(tmp, ignore_errors=True))
        record = await asyncio.wrap_future(future)
        recent[:] = [*recent[-19:], record["total"]]
        return _described(worker, reply.id, record)

    @app.get(
        "/v1/renders/{rid}", summary="Status and timings of a render", dependencies=[Depends(authorized)]
    )
    def render_status(rid: str) -> dict:  # plain def: FastAPI runs it on its thread pool (store reads)
        rid = validate_id(rid, "request id")
        store = worker.store
        if store.exists(keys.render_timings(rid)):
            return {
                "status": "done",
                **_described(worker, rid, json.loads(store.get_bytes(keys.render_timings(rid)))),
            }
        if store.exists(keys.failed_render(rid)):
            failure = json.loads(store.get_bytes(keys.failed_render(rid)))
            return {"id": rid, "status": "failed", "error": failure.get("error", "")}
        status = worker.status(rid) or ("rendering" if store.exists(keys.claim(rid)) else None)
        if status is None:
            raise HTTPException(404, f"no render {rid}")
        return {"id": rid, "status": status}

    @app.get(
        "/v1/renders/{rid}/video",
        summary="The MP4 of a finished render",
        dependencies=[Depends(authorized)],
        response_class=Response,
    )
    def render_video(rid: str) -> Response:  # plain def: on the thread pool, like render_status
        rid = validate_id(rid, "request id")
        if not worker.store.exists(keys.render_timings(rid)):  # the record comes last: the video is whole
            raise HTTPException(404, f"no finished render {rid}")
        data = worker.store.get_bytes(keys.render_video(rid))
        return Response(
            data, media_type="video/mp4", headers={"Content-Disposition": f'inline; filename="{rid}.mp4"'}
        )

    app.add_middleware(BodyLimit, max_bytes=worker.limits.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


class _Unauthorized(Exception):
    pass


async def _read_reply(request: Request, tmp: Path, worker: Worker) -> Reply:
    """A ``Reply`` from a multipart upload or a JSON body naming an audio object (validated)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("audio")
        if upload is None or isinstance(upload, str) or not upload.filename:
            raise InputError("audio: attach the speech as a file field named 'audio'")
        fields = {name: form.get(name) for name in ("template", "id", "options")}
        if any(value is not None and not isinstance(value, str) for value in fields.values()):
            raise InputError("template, id and options must be text fields")
        body = {"template": fields["template"], "id": fields["id"]}
        options = _json_options(fields["options"])
        rid = validate_id(body["id"] or new_request_id(), "request id")
        audio_key = keys.audio(rid, Path(upload.filename).suffix)  # a known audio type, or refused here
        audio_file = tmp / Path(audio_key).name
        with open(audio_file, "wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
    elif kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:
            raise InputError(f"not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise InputError("expected a JSON object")
        unknown = sorted(set(body) - {"template", "audio", "id", "options"})
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r}")
        options = body.get("options") or {}
        rid = validate_id(body.get("id") or new_request_id(), "request id")
        audio_file, audio_key = None, keys.audio_object(body.get("audio"))
        if not await asyncio.to_thread(worker.store.exists, audio_key):
            raise InputError(f"audio object {worker.store.uri(audio_key)} does not exist")
    else:
        raise UnsupportedMedia()
    if body.get("template") is None:
        raise InputError("missing field 'template'")
    return Reply(
        id=rid,
        template=validate_id(body["template"], "template id"),
        options=check_options(options, worker.settings),
        audio_file=audio_file,
        audio_key=audio_key,
    )


def _json_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"options: not valid JSON ({e})") from None


def _described(worker: Worker, rid: str, record: dict) -> dict:
    video = keys.render_video(rid)
    return {"id": rid, "video": video, "uri": worker.store.uri(video), "timings": record}

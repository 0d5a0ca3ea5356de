"""`vidrt serve`: an asynchronous video-job API in the OpenAI `/v1/videos` shape, and a web page.

    GET    /                               the web page (web/index.html: plain HTML + JS over this API)
    POST   /v1/videos                      create a job (JSON or multipart/form-data) -> Video, status "queued"
    GET    /v1/videos?after=&limit=&order= jobs, newest first by default; first_id, last_id, has_more
    GET    /v1/videos/{id}                 status, progress 0-100, stage, step i/N, ETA, error
    GET    /v1/videos/{id}/content         the clip; ?variant=thumbnail|spritesheet: JPEG stills
    POST   /v1/videos/{id}/cancel          stop a queued or running job, keep its record (vidrt)
    DELETE /v1/videos/{id}                 cancel if needed, then delete the record and its files
    GET    /v1/models                      the served model and what it can make (sizes, frames, fps)
    GET    /v1/workers                     the worker actors: pid, host, current job, clips done, deaths
    GET    /health                         liveness (no token needed)
    GET    /openapi.json, /docs            the schema

The HTTP server (uvicorn) and the JobManager run in this process on one event loop; the workers
are Ray actors (scaleout.py), one per GPU. The job table lives in SQLite beside the clips
(store.py), so a restarted server serves what the last one made and runs what it had queued.
Before FastAPI sees a request, guard.py refuses foreign Host headers, missing tokens and bodies
over --max-body, without reading the body. fastapi/uvicorn come with the [serve] extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from vidrt.errors import UsageError
from vidrt.service.api import (
    API_FIELDS,
    ApiError,
    CreateVideoRequest,
    ErrorResponse,
    ServeLimits,
    Video,
    VideoAPI,
    VideoDeleted,
    VideoList,
    image_input,
    validation_message,
)
from vidrt.service.guard import LOOPBACK_NAMES, Guard, error_body
from vidrt.service.previews import MEDIA_TYPE as PREVIEW_MEDIA_TYPE
from vidrt.service.scaleout import ACTIVE, Job, JobManager, check_out_dir
from vidrt.service.store import DB_NAME, JobStore

log = logging.getLogger(__name__)
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}
MIN_PUBLIC_TOKEN = 16  # characters; shorter tokens are refused for non-loopback binds
DEFAULT_MAX_BODY = 1 << 20  # a prompt and settings fit many times over
IMAGE_MAX_BODY = 16 << 20  # once input_reference images are taken (image_input): a large PNG
POLL_AFTER_MS = 500  # openai-poll-after-ms: how often the SDK's poll() asks while a job is active
LIST_FIELDS = ("loras",)  # form fields that may repeat (`loras`, or `loras[]` as the openai SDK sends lists)


@dataclass(frozen=True)
class ServeConfig:
    package: str
    out_dir: str
    workers: int | None = None
    threads: int | None = None
    backend: str = "auto"
    use_gpu: bool | None = None
    token: str | None = None
    max_queue: int = 1000
    max_steps: int = 100
    max_frames: int | None = None  # None: the model's default frame count
    max_pixels: int | None = None  # width x height; None: the model's largest listed size (or max_size's area)
    max_size: tuple[int, int] | None = None  # --max-size WIDTHxHEIGHT: sets max_pixels; the default size if none fits
    max_attempts: int = 3
    max_body: int | None = None  # bytes; None: DEFAULT_MAX_BODY, or IMAGE_MAX_BODY when the model takes an image
    allowed_hosts: tuple[str, ...] | None = ()  # () = the defaults (allowed_hosts_for); None = any Host
    cors_origins: tuple[str, ...] = ()
    keep_seconds: float | None = None  # None: keep finished clips until deleted
    lora_dir: str | None = None  # the folder whose LoRA files requests may name (bare names); None: no LoRAs


# ---- binding rules -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if is_loopback(host):
        return
    if not token:
        raise UsageError(f"--host {host} is reachable from other machines: give --token-file FILE (or --token T; "
                         f"clients send Authorization: Bearer T), or bind 127.0.0.1")
    if len(token) < MIN_PUBLIC_TOKEN:
        raise UsageError(f"the token is {len(token)} characters; --host {host} needs at least {MIN_PUBLIC_TOKEN} "
                         f"(make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')")


def allowed_hosts_for(host: str, extra: tuple[str, ...] | None) -> set[str] | None:
    """The Host names a server bound to `host` answers to: loopback names, the bound address, and for a
    wildcard bind this machine's names and addresses; plus `extra` (--allow-host). None: any ('*')."""
    if extra is None or "*" in extra:
        return None
    names = {*LOOPBACK_NAMES, *(h.lower() for h in extra)}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.lower())
    else:  # a wildcard bind: this machine's names and addresses (never "0.0.0.0", which browsers send to loopback)
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        with contextlib.suppress(OSError):
            names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(hostname, None)}
        for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
            # the address of the interface that routes outwards (a UDP connect sends nothing)
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                names.add(str(s.getsockname()[0]).lower())
    return names


# ---- the application ---------------------------------------------------------------------------


@dataclass
class State:
    config: ServeConfig
    api: VideoAPI
    manager: JobManager
    store: JobStore
    startup_error: BaseException | None = None
    on_startup_error: Any = None
    on_ready: Any = None  # called once a worker has the model loaded (the CLI prints "serving on ...")
    started_at: float = field(default_factory=time.time)


def _page() -> str:
    return resources.files("vidrt.service").joinpath("web/index.html").read_text(encoding="utf-8")


async def _create_fields(request: Request) -> tuple[dict[str, Any], bytes | None, bool]:
    """The create request's fields, from JSON or a form, input_reference's bytes if one was sent, and
    whether it was a form (whose fields are all text)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=1, max_fields=64)
        except ClientDisconnect:
            raise
        except Exception as exc:  # python-multipart's MultiPartException and starlette's HTTPException
            raise ApiError(400, f"the form cannot be read ({getattr(exc, 'detail', None) or exc})") from None
        fields: dict[str, Any] = {}
        image = None
        for key, value in form.multi_items():
            if key == "input_reference":
                if image is not None:
                    raise ApiError(400, f"{key}: given twice", key)
                image = await value.read() if hasattr(value, "read") else str(value).encode()
                continue
            if key.removesuffix("[]") not in CreateVideoRequest.model_fields:  # before "given twice"
                raise ApiError(400, *validation_message([{"type": "extra_forbidden", "loc": (key,)}]))
            if not isinstance(value, str):
                raise ApiError(400, f"{key}: must be a text field, not a file", key)
            if key in LIST_FIELDS or key.removesuffix("[]") in LIST_FIELDS:  # repeated; the SDK sends loras[]
                fields.setdefault(key.removesuffix("[]"), []).append(value)
                continue
            if key in fields:
                raise ApiError(400, f"{key}: given twice", key)
            fields[key] = value
        return fields, image, True
    if kind not in ("application/json", ""):
        raise ApiError(400, f"content-type {kind} is not accepted; send application/json or multipart/form-data")
    try:
        data = await request.json()
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object like {\"prompt\": \"a cat\"}")
    image = data.pop("input_reference", None)
    return data, (repr(image).encode() if image is not None else None), False


_CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": CreateVideoRequest.model_json_schema()},
    "multipart/form-data": {"schema": {**CreateVideoRequest.model_json_schema(), "properties": {
        **CreateVideoRequest.model_json_schema()["properties"],
        "input_reference": {"type": "string", "format": "binary",
                            "description": "The first frame (image-to-video models; others refuse it)."}}}}}}}
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                           for code in (400, 401, 404, 409, 413, 429, 503)}


def create_app(state: State) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await state.manager.start()  # a worker has the model loaded before the port opens
            if state.on_ready is not None:
                state.on_ready()
        except BaseException as exc:  # reported by Service after uvicorn stops (one line, no traceback)
            state.startup_error = exc
            if state.on_startup_error is not None:
                state.on_startup_error()
        try:
            yield
        finally:
            await state.manager.shutdown()
            state.store.close()

    app = FastAPI(title="vidrt", version="2", lifespan=lifespan,
                  description="Wan2.1 / Wan2.2 video generation jobs in the OpenAI /v1/videos shape.")
    api, manager, config = state.api, state.manager, state.config

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.status == 409:
            headers["x-should-retry"] = "false"  # the OpenAI SDK retries 409 unless told not to
        if exc.status == 429:
            headers["retry-after"] = "1"
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(400, message, param), 400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    def job_of(video_id: str) -> Job:
        job = manager.jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r} (deleted, expired or never made); ids come from POST "
                                f"/v1/videos", "video_id", "not_found")
        return job

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page(), headers={"cache-control": "no-cache", "x-frame-options": "DENY",
                                              "content-security-policy": "default-src 'self'; style-src 'self' "
                                              "'unsafe-inline'; script-src 'self' 'unsafe-inline'; media-src 'self' "
                                              "blob:; img-src 'self' blob: data:; frame-ancestors 'none'"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": api.spec.name, "workers": sum(s.alive for s in manager.slots),
                "queued": manager.queued(), "auth": config.token is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": api.spec.name, "object": "model", "created": int(state.started_at),
                                            "owned_by": "vidrt", "capabilities": api.capabilities()}]}

    def check_room() -> None:
        if not any(s.alive for s in manager.slots):
            raise ApiError(503, "no worker is running; the server's operator must restart the server")
        if manager.queued() >= config.max_queue:
            raise ApiError(429, f"the queue is full ({config.max_queue} jobs); retry later", code="queue_full")

    @app.post("/v1/videos", response_model=Video, responses=ERRORS, openapi_extra=_CREATE_BODY)
    async def create_video(request: Request) -> Video:
        check_room()  # from the headers: a body this server would refuse is never read
        try:
            fields, image, form = await _create_fields(request)
        except ClientDisconnect:
            log.warning("POST /v1/videos: the client went away before its body arrived")
            return Response(status_code=499)  # type: ignore[return-value]  # nobody is left to read it
        # off the event loop: a LoRA's values are read (and a twin hashed) once its limits passed
        job, settings, asked = await asyncio.to_thread(api.to_job, fields, image, form)
        try:
            check_room()  # again: the queue may have filled while the body arrived
        except ApiError:
            manager.release_input(Path(job.image) if job.image else None)  # its kept image, unless a job has it
            raise
        if image is not None and job.image and not Path(job.image).is_file():
            api.keep_image(image)  # the last job sharing it was deleted while this request was checked
        return api.video(manager.submit(job, settings, api=asked))

    @app.get("/v1/videos", response_model=VideoList, responses=ERRORS)
    async def list_videos(after: str | None = Query(None, max_length=200), limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc") -> VideoList:
        jobs = sorted(manager.jobs.values(), key=lambda j: j.seq, reverse=order == "desc")
        if after is not None:  # the cursor may have been deleted since (a client deleting as it pages)
            cursor = manager.jobs[after].seq if after in manager.jobs else manager.deleted_seq.get(after)
            if cursor is None:
                raise ApiError(400, f"after: no video {after!r}; start again without after", "after")
            jobs = [j for j in jobs if (j.seq < cursor if order == "desc" else j.seq > cursor)]
        page = jobs[:limit]
        return VideoList(data=[api.video(j) for j in page], first_id=page[0].id if page else None,
                         last_id=page[-1].id if page else None, has_more=limit < len(jobs))

    @app.get("/v1/videos/{video_id}", response_model=Video, responses=ERRORS)
    async def retrieve_video(response: Response, video_id: str = PathParam(max_length=200)) -> Video:
        job = job_of(video_id)
        if job.status in ACTIVE:
            response.headers["openai-poll-after-ms"] = str(POLL_AFTER_MS)
        return api.video(job)

    @app.get("/v1/videos/{video_id}/content", response_class=FileResponse, responses={
        **ERRORS, 200: {"content": {"video/mp4": {}, "video/webm": {}, PREVIEW_MEDIA_TYPE: {}},
                        "description": "The clip, or a JPEG thumbnail / sprite sheet of it."}})
    async def video_content(video_id: str = PathParam(max_length=200),
                            variant: Literal["video", "thumbnail", "spritesheet"] = "video") -> FileResponse:
        job = job_of(video_id)
        if job.status in ("failed", "cancelled"):
            raise ApiError(409, f"video {video_id} is {job.status}: it has no content; create a new video",
                           code=job.status)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status} ({int(job.percent)}%); its content exists once "
                                f"GET /v1/videos/{video_id} says completed", code=job.status)
        path = job.output if variant == "video" else job.preview_path(variant)
        if not path.is_file():
            raise ApiError(404, f"the {variant} of video {video_id} is not on the server", "variant", "file_missing")
        media = MEDIA_TYPES.get(path.suffix, "application/octet-stream") if variant == "video" else PREVIEW_MEDIA_TYPE
        return FileResponse(path, media_type=media, filename=f"{video_id}{'' if variant == 'video' else '.' + variant}"
                                                                  f"{path.suffix}")

    @app.post("/v1/videos/{video_id}/cancel", response_model=Video, responses=ERRORS)
    async def cancel_video(video_id: str = PathParam(max_length=200)) -> Video:
        """Stop a queued or running job (the worker stops at its next step or frame); the record stays,
        with status "failed" and error code "cancelled"."""
        job = job_of(video_id)
        if job.status not in ACTIVE and job.status != "cancelled":
            raise ApiError(409, f"video {video_id} is already {job.status}; DELETE removes it", code=job.status)
        return api.video(manager.cancel(video_id) or job)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=ERRORS)
    async def delete_video(video_id: str = PathParam(max_length=200)) -> VideoDeleted:
        """Delete a video: a queued or running one is cancelled first. Its record and files are gone
        afterwards, so a second DELETE gets 404, like any unknown id."""
        job_of(video_id)
        manager.delete(video_id)
        return VideoDeleted(id=video_id, deleted=True)

    @app.get("/v1/workers")
    async def workers() -> dict[str, Any]:
        return {"object": "list", "data": manager.workers(), "retries": manager.retries}

    return app


# ---- starting and stopping ---------------------------------------------------------------------


def check_config(config: ServeConfig, spec: Any = None) -> ServeLimits:
    """What can be refused before Ray or a worker starts (the CLI calls this first): --max-size on the
    model's size grid, --max-frames at least 1, --max-steps at least the model's default steps, --out a
    folder this server can have. -> the limits."""
    if spec is None:
        from vidrt.package.manifest import load_manifest

        spec = load_manifest(config.package, verify=False).model
    if config.max_size is not None:
        m, (w, h) = spec.spatial_multiple, config.max_size
        if w < m or h < m or w % m or h % m:
            fix = f"{max(m, w // m * m)}x{max(m, h // m * m)}"
            raise UsageError(f"--max-size {w}x{h}: {spec.name} makes sizes in multiples of {m} pixels; use "
                             f"--max-size {fix}")
    if config.max_frames is not None and config.max_frames < 1:
        raise UsageError(f"--max-frames {config.max_frames} must be at least 1")
    if config.max_steps < spec.sampling.steps:  # unlike size and length, a step count is not lowered quietly
        raise UsageError(f"--max-steps {config.max_steps} is under {spec.name}'s default of {spec.sampling.steps} "
                         f"steps, so every request that names no steps would be refused; use --max-steps "
                         f"{spec.sampling.steps} or more (requests may still ask for fewer)")
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the clips and the job table")
    existed = out.is_dir()
    check_out_dir(out)  # writable (a read-only mount: exit 5), before Ray starts
    if existed:
        open_store(out).close()  # another serve holding the folder is refused now, not after Ray starts
    else:
        out.rmdir()  # made only to try it: Service makes it again
    max_pixels = config.max_pixels or (config.max_size[0] * config.max_size[1] if config.max_size else None)
    return ServeLimits(max_pixels=max_pixels or max(w * h for w, h in spec.sampling.sizes),
                       max_frames=config.max_frames or spec.sampling.frames, max_steps=config.max_steps,
                       max_size=config.max_size)


def open_store(out: Path) -> JobStore:
    """--out's job table, the folder created if needed; UsageError if it is a file or another serve's."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the clips and the job table")
    check_out_dir(out)
    return JobStore(out / DB_NAME)


class Service:
    """One `vidrt serve`: the job table opened (and locked), the app built. run() blocks (the CLI);
    start_in_thread() / stop() are for tests. Ray must already be connected (scaleout.connect_ray)."""

    def __init__(self, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
        import uvicorn
        from vidrt.package.manifest import load_manifest

        check_bind(host, config.token)
        spec = load_manifest(config.package, verify=False).model
        limits = check_config(config, spec)
        out = Path(config.out_dir)
        store = open_store(out)
        manager = JobManager(config.package, out, workers=config.workers, threads=config.threads,
                             backend=config.backend, use_gpu=config.use_gpu, max_attempts=config.max_attempts,
                             store=store, keep_seconds=config.keep_seconds, previews=True,
                             lora_dir=config.lora_dir, spelling=API_FIELDS,  # job errors worded for the client
                             inputs_dir=out / "inputs")
        self.restored = manager.restore()
        api = VideoAPI(spec, limits, config.package, manager.inputs_dir,  # input_reference images kept here
                       lora_dir=config.lora_dir)
        self.state = State(config=config, api=api, manager=manager, store=store,
                           on_startup_error=self._startup_failed)
        self.app = create_app(self.state)
        asgi: Any = Guard(self.app, token=config.token, allowed_hosts=allowed_hosts_for(host, config.allowed_hosts),
                          max_body=config.max_body or (IMAGE_MAX_BODY if image_input(spec) else DEFAULT_MAX_BODY))
        if config.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            asgi = CORSMiddleware(asgi, allow_origins=list(config.cors_origins),
                                  allow_methods=["GET", "POST", "DELETE"],
                                  allow_headers=["authorization", "content-type"])
        self.server = uvicorn.Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning", lifespan="on",
                                                    server_header=False, timeout_graceful_shutdown=5,
                                                    h11_max_incomplete_event_size=64 * 1024))
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self._thread: threading.Thread | None = None

    def warning(self) -> str | None:
        return self.state.manager.capacity_warning()

    def _startup_failed(self) -> None:
        self.server.should_exit = True

    def _raise_startup_error(self) -> None:
        exc = self.state.startup_error
        if exc is not None:
            raise exc if isinstance(exc, (UsageError, Exception)) else RuntimeError(str(exc))

    def run(self) -> None:
        """Serve until Ctrl-C / SIGTERM (uvicorn's handlers stop it gracefully: workers end, scratch goes)."""
        self.server.run()
        self._raise_startup_error()

    def start_in_thread(self, timeout: float = 300.0) -> str:
        self._thread = threading.Thread(target=self.server.run, name="vidrt-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._raise_startup_error()
        if not self.server.started:
            raise RuntimeError(f"the server did not start within {timeout:.0f} s")
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


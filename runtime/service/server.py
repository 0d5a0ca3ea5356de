"""`vidrt serve`: an asynchronous video-job API (OpenAI `/v1/videos` shape) on Ray Serve + FastAPI.

    POST   /v1/videos                 create a job -> Video {id, object: "video", status: "queued", ...}
    GET    /v1/videos                 recent jobs, newest first
    GET    /v1/videos/{id}            status, progress 0-100, stage, step i/N, ETA, error
    GET    /v1/videos/{id}/content    the finished clip (409 until status is "completed")
    DELETE /v1/videos/{id}            cancel a queued/running job, or delete a finished one and its file
    GET    /v1/workers                the worker actors: pid, host, current job, clips done, deaths
    GET    /health                    liveness (no token needed)
    GET    /openapi.json, /docs       the schema

One Serve replica (the ingress) holds the job table and a JobManager (scaleout.py) that owns the
worker actors, one per GPU. Clips are published into --out on the ingress's node. Errors are
{"error": {"message": one line, "type", "param", "code"}} with a 4xx status for bad requests.
Imported only by the serve command: fastapi and ray live in the [serve] extra.
"""

# No `from __future__ import annotations`: Serve's ingress re-wraps the route methods and FastAPI
# must see real types, not strings, in their signatures.
import hmac
import ipaddress
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException
from vidrt.errors import UsageError
from vidrt.request import MAX_FRAMES, MAX_SEED, MAX_STEPS
from vidrt.service.jobs import JobRequest
from vidrt.service.scaleout import Job, JobManager

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}


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
    max_pixels: int | None = None  # width x height; None: the model's largest listed size
    max_attempts: int = 3


# ---- schema ------------------------------------------------------------------------------------


class CreateVideoRequest(BaseModel):
    """OpenAI's create-video fields (prompt, model, size, seconds) plus vidrt's sampling controls."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20000, description="What the clip shows.")
    model: str | None = Field(None, max_length=200, description="The served model's name (optional).")
    negative_prompt: str | None = Field(None, max_length=20000)
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT, e.g. 832x480.")
    seconds: str | None = Field(None, pattern=r"^[0-9]{1,4}(\.[0-9]{1,3})?$",
                                description="Clip length; rounded to the model's 4k+1 frames. Or give frames.")
    frames: int | None = Field(None, ge=1, le=MAX_FRAMES, description="Video frames, 4k+1.")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(None, ge=0, le=50)
    guidance_low_noise: float | None = Field(None, ge=0, le=50,
                                             description="Two-expert models (A14B): the low-noise expert scale.")
    shift: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="None or -1: a random one (kept in the file).")
    scheduler: Literal["unipc", "dpm++"] | None = None
    output_format: Literal["mp4", "webm"] = "mp4"
    fps: int | None = Field(None, ge=1, le=240)
    crf: int | None = Field(None, ge=0, le=63)


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None = None
    status: Status
    progress: int = Field(ge=0, le=100)
    model: str
    size: str
    seconds: str
    error: VideoError | None = None
    # vidrt extensions
    stage: str | None = Field(None, description="text | denoise | decode | done while in progress")
    step: int | None = Field(None, description="steps (denoise) or frames (decode) done in this stage")
    steps: int | None = Field(None, description="of this many")
    eta_seconds: float | None = None
    attempts: int = Field(0, description="tries so far; >1 after a worker died mid-clip")
    stats: dict[str, Any] | None = Field(None, description="per-stage seconds and settings, once completed")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 429, 503)}

app = FastAPI(title="vidrt", version="1", description="Wan2.1 / Wan2.2 video generation jobs (OpenAI /v1/videos "
                                                         "shape).")
bearer = HTTPBearer(auto_error=False, description="--token of `vidrt serve`, when it was given")


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = ErrorResponse(error=ErrorDetail(message=" ".join(message.split()), type=kind, param=param, code=code))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    where = ".".join(loc)
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        msg, where = "the body is not valid JSON", ""
    elif first.get("type") == "extra_forbidden":
        msg = f"unknown field; fields are {', '.join(CreateVideoRequest.model_fields)}"
    return _error(400, f"{where}: {msg}" if where else msg, param=where or None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


def require_token(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    token = getattr(request.app.state, "token", None)
    if token is None:
        return
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token: send Authorization: Bearer <token>")


# ---- the ingress deployment --------------------------------------------------------------------


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class VideoAPI:
    async def __init__(self, config: ServeConfig) -> None:
        from vidrt.package.manifest import load_manifest

        self.config = config
        self.spec = load_manifest(config.package, verify=False).model
        sizes = self.spec.sampling.sizes
        self.max_pixels = config.max_pixels or max(w * h for w, h in sizes)
        self.max_frames = config.max_frames or self.spec.sampling.frames
        app.state.token = config.token
        self.manager = JobManager(config.package, config.out_dir, workers=config.workers, threads=config.threads,
                                  backend=config.backend, use_gpu=config.use_gpu, max_attempts=config.max_attempts)
        await self.manager.start()  # every worker has the model loaded before Serve reports ready

    # -- helpers --

    def _job(self, video_id: str) -> Job:
        job = self.manager.jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r}; ids come from POST /v1/videos", "video_id")
        return job

    def _video(self, job: Job) -> Video:
        s = job.settings
        fps = job.request.fps or self.spec.sampling.fps
        event = job.event if job.status == "in_progress" else None
        error = VideoError(code=job.error_code or job.status, message=job.error) if job.error else None
        if job.status == "cancelled":
            error = VideoError(code="cancelled", message="the job was cancelled (DELETE)")
        return Video(id=job.id, created_at=int(job.created_at),
                     completed_at=int(job.completed_at) if job.completed_at and job.done.is_set() else None,
                     status=job.status, progress=int(math.floor(job.percent)), model=self.spec.name,
                     size=f"{s.width}x{s.height}", seconds=f"{s.num_frames / fps:g}", error=error,
                     stage=event.stage if event else None, step=event.done if event else None,
                     steps=event.total if event else None,
                     eta_seconds=round(event.eta_seconds, 1) if event and event.eta_seconds is not None else None,
                     attempts=job.attempts, stats=job.result.get("stats") if job.result else None)

    def _to_job(self, body: CreateVideoRequest) -> JobRequest:
        if body.model is not None and body.model != self.spec.name:
            raise ApiError(400, f"model {body.model!r} is not served here; this server runs {self.spec.name!r}",
                           "model")
        if body.seconds is not None and body.frames is not None:
            raise ApiError(400, "give seconds or frames, not both", "seconds")
        frames = body.frames
        if body.seconds is not None:
            fps = body.fps or self.spec.sampling.fps
            ft = self.spec.vae.stride[0]
            frames = ft * max(0, round(float(body.seconds) * fps / ft)) + 1
        fields = body.model_dump(exclude={"model", "seconds"}, exclude_none=True)
        fields["frames"] = frames
        try:
            job = JobRequest.from_dict(fields, where="request").seeded()  # a retry after a worker died: same seed
            settings = job.settings(self.spec)
        except UsageError as exc:
            raise ApiError(400, str(exc)) from None
        if settings.width * settings.height > self.max_pixels:
            raise ApiError(400, f"size {settings.width}x{settings.height} is over this server's limit of "
                                f"{self.max_pixels} pixels per frame", "size")
        if settings.num_frames > self.max_frames:
            raise ApiError(400, f"{settings.num_frames} frames is over this server's limit of {self.max_frames}",
                           "frames")
        if settings.steps > self.config.max_steps:
            raise ApiError(400, f"{settings.steps} steps is over this server's limit of {self.config.max_steps}",
                           "steps")
        return job

    # -- routes --

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.spec.name, "workers": sum(s.alive for s in self.manager.slots),
                "queued": self.manager.queued()}

    @app.post("/v1/videos", response_model=Video, responses=ERRORS, dependencies=[Depends(require_token)])
    async def create_video(self, body: CreateVideoRequest) -> Video:
        job = self._to_job(body)
        if not any(s.alive for s in self.manager.slots):
            raise ApiError(503, "no worker is running; restart `vidrt serve`")
        if self.manager.queued() >= self.config.max_queue:
            raise ApiError(429, f"the queue is full ({self.config.max_queue} jobs); retry later")
        return self._video(self.manager.submit(job, job.settings(self.spec)))

    @app.get("/v1/videos", response_model=VideoList, responses=ERRORS, dependencies=[Depends(require_token)])
    async def list_videos(self, limit: int = Query(20, ge=1, le=100)) -> VideoList:
        jobs = sorted(self.manager.jobs.values(), key=lambda j: j.created_at, reverse=True)[:limit]
        return VideoList(data=[self._video(j) for j in jobs])

    @app.get("/v1/videos/{video_id}", response_model=Video, responses=ERRORS, dependencies=[Depends(require_token)])
    async def retrieve_video(self, video_id: str = PathParam(max_length=200)) -> Video:
        return self._video(self._job(video_id))

    @app.get("/v1/videos/{video_id}/content", response_class=FileResponse, dependencies=[Depends(require_token)],
             responses={**ERRORS, 200: {"content": {"video/mp4": {}, "video/webm": {}},
                                        "description": "The finished clip."}})
    async def video_content(self, video_id: str = PathParam(max_length=200)) -> FileResponse:
        job = self._job(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status} ({int(job.percent)}%); its content exists once "
                                f"GET /v1/videos/{video_id} says completed", code=job.status)
        path = Path(job.output)
        if not path.is_file():
            raise ApiError(404, f"the file of video {video_id} is gone from the server", code="file_missing")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=f"{video_id}{path.suffix}")

    @app.delete("/v1/videos/{video_id}", response_model=Video | VideoDeleted, responses=ERRORS,
                dependencies=[Depends(require_token)])
    async def delete_video(self, video_id: str = PathParam(max_length=200)) -> Video | VideoDeleted:
        """Queued or running: cancel it (status "cancelled"; the worker stops at its next step or frame).
        Finished: delete the record and its file."""
        job = self._job(video_id)
        if job.status in ("queued", "in_progress"):
            return self._video(self.manager.cancel(video_id) or job)
        self.manager.delete(video_id)
        return VideoDeleted(id=video_id, deleted=True)

    @app.get("/v1/workers", dependencies=[Depends(require_token)])
    async def workers(self) -> dict[str, Any]:
        return {"object": "list", "data": self.manager.workers(), "retries": self.manager.retries}


# ---- starting and stopping ---------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise UsageError(f"--host {host} is reachable from other machines: give --token T (clients send "
                         f"Authorization: Bearer T), or bind 127.0.0.1")


def start_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy on the connected Ray cluster; returns once every worker has loaded the model."""
    check_bind(host, config.token)
    warning = JobManager(config.package, config.out_dir, workers=config.workers, threads=config.threads,
                         use_gpu=config.use_gpu).capacity_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    serve.start(http_options={"host": host, "port": port})
    serve.run(VideoAPI.bind(config), name="vidrt", route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def stop_server() -> None:
    serve.shutdown()


def wait_forever() -> None:
    while True:
        time.sleep(3600)


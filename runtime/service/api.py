"""The OpenAI `/v1/videos` shapes of `vidrt serve`, and the translation between them and vidrt's jobs.

    api = VideoAPI(spec, ServeLimits(max_pixels=..., max_frames=..., max_steps=...))
    job, settings, asked = api.to_job({"prompt": "a cat", "seconds": "4", "size": "832x480"}, image=None)
    api.video(manager_job)   # -> Video, the object the OpenAI SDK parses (openai.types.Video)

Field names and meanings follow the OpenAI API reference for videos (create: prompt, model, seconds,
size, input_reference; Video: id, object, created_at, completed_at, expires_at, status, progress,
model, prompt, seconds, size, error, remixed_from_video_id) as the `openai` Python SDK 3.57 sends
and parses them; vidrt's own sampling controls (frames, steps, guidance, ...) ride along as extra
fields. `seconds` becomes frames with the model's fps and the VAE's temporal stride: frames =
stride * round(seconds * fps / stride) + 1 (4k+1 for Wan). Every refusal is an ApiError: status,
one line naming the field and what this server can do instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from vidrt.errors import UsageError
from vidrt.lora import parse_lora_arg, read_lora
from vidrt.package.registry import ModelSpec
from vidrt.request import MAX_FRAMES, MAX_SEED, MAX_STEPS, Settings
from vidrt.schedulers import SOLVERS
from vidrt.service.jobs import JobRequest

Status = Literal["queued", "in_progress", "completed", "failed"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _number_to_text(value: Any) -> Any:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _no_bool(value: Any) -> Any:
    """pydantic's lax mode reads true as 1; the Python API refuses booleans for numbers (errors.md 11b)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _one_or_list(value: Any) -> Any:
    """A form sends a one-item list as a single field (`-F loras=style.safetensors`)."""
    return [value] if isinstance(value, str) else value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class CreateVideoRequest(BaseModel):
    """OpenAI's create-video fields (prompt, model, seconds, size; input_reference travels beside this
    model, as a file) plus vidrt's sampling controls. The same fields as JSON or multipart/form-data."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20000, description="What the clip shows.")
    model: str | None = Field(None, max_length=200, description="The served model's name (optional).")
    seconds: Annotated[str, BeforeValidator(_number_to_text)] | None = Field(
        None, pattern=r"^[0-9]{1,4}(\.[0-9]{1,3})?$",
        description="Clip length; becomes the model's 4k+1 frames at its fps. Or give frames.")
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT, e.g. 832x480.")
    negative_prompt: str | None = Field(None, max_length=20000)
    frames: Int | None = Field(None, ge=1, le=MAX_FRAMES, description="Video frames, 4k+1 (instead of seconds).")
    steps: Int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: Float | None = Field(None, ge=0, le=50)
    guidance_low_noise: Float | None = Field(None, ge=0, le=50,
                                             description="Two-expert models (A14B): the low-noise expert scale.")
    shift: Float | None = Field(None, gt=0, le=100)
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="None or -1: a random one (kept in the file).")
    scheduler: Literal[tuple(SOLVERS)] | None = None  # type: ignore[valid-type]
    recipe: str | None = Field(None, max_length=100, description="A named recipe, e.g. lightx2v-4step.")
    loras: Annotated[list[str], BeforeValidator(_one_or_list)] | None = Field(
        None, max_length=16, description="LoRA file names in the server's --lora-dir: NAME[:STRENGTH] (A14B: "
        "dit_high=NAME[:STRENGTH], dit_low=...); a form repeats the field (loras or loras[]).")
    cache: str | None = Field(None, max_length=40, pattern=r"^[a-z]+(:[0-9.]+)?$",
                              description="Step caching METHOD[:THRESHOLD]: teacache, magcache, easycache, fbcache.")
    output_format: Literal["mp4", "webm"] = "mp4"
    fps: Int | None = Field(None, ge=1, le=240)
    crf: Int | None = Field(None, ge=0, le=63)


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = Field(None, description="when --keep removes it; null: kept until deleted")
    status: Status
    progress: int = Field(ge=0, le=100)
    model: str
    prompt: str
    seconds: str = Field(description="as requested (or the model's default length)")
    size: str = Field(description="as requested (or the model's default size)")
    error: VideoError | None = Field(None, description="why it failed; code 'cancelled' for a cancelled job")
    remixed_from_video_id: str | None = None
    # vidrt extensions
    frames: int = Field(description="video frames the clip has")
    output_format: str = "mp4"
    stage: str | None = Field(None, description="text | denoise | decode | done while in progress")
    step: int | None = Field(None, description="steps (denoise) or frames (decode) done in this stage")
    steps: int | None = Field(None, description="of this many")
    eta_seconds: float | None = None
    attempts: int = Field(0, description="tries so far; >1 after a worker died mid-clip")
    stats: dict[str, Any] | None = Field(None, description="per-stage seconds and settings, once completed")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


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


@dataclass(frozen=True)
class ServeLimits:
    max_pixels: int  # width x height
    max_frames: int
    max_steps: int
    max_size: tuple[int, int] | None = None  # --max-size as given (the default size when no listed size fits)


def image_input(spec: ModelSpec) -> bool:
    """Does the model take an image (input_reference)? Models without one refuse it with a 400."""
    return spec.image is not None


class VideoAPI:
    def __init__(self, spec: ModelSpec, limits: ServeLimits, package: str | None = None,
                 image_dir: str | Path | None = None, lora_dir: str | None = None) -> None:
        """image_dir: where uploaded input_reference images are kept (named by their sha256, so the same
        image is stored once and a retried job finds it); default: a temporary folder. lora_dir: the
        operator's folder of LoRA files that requests may name (None: requests take no LoRAs)."""
        self.spec = spec
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.lora_dir = Path(lora_dir).resolve() if lora_dir is not None else None
        self._lora_checked: dict[tuple[str, int, int], str | None] = {}  # (name, mtime_ns, size) -> refusal
        self.limits = limits
        self.names = {spec.name} | ({Path(package).name} if package else set())
        self.fps = spec.sampling.fps
        self.stride = spec.vae.stride[0]

    # -- what this server can do -------------------------------------------------------------------

    def sizes(self) -> list[str]:
        return [f"{w}x{h}" for w, h in self.spec.sampling.sizes if w * h <= self.limits.max_pixels]

    def frame_counts(self) -> list[int]:
        return list(range(1, self.limits.max_frames + 1, self.stride))

    def default_size(self) -> tuple[int, int] | None:
        """The size a request without one gets: the model's default when it fits the cap, else the largest
        listed size that does, else --max-size itself (Service checks it is a valid size); None: no size
        fits (then every request must bring a smaller one)."""
        listed = self.spec.sampling.sizes
        if listed[0][0] * listed[0][1] <= self.limits.max_pixels:
            return listed[0]
        fits = [wh for wh in listed if wh[0] * wh[1] <= self.limits.max_pixels]
        if fits:
            return max(fits, key=lambda wh: wh[0] * wh[1])
        return self.limits.max_size

    def default_frames(self) -> int:
        """The model's default frame count, or the cap's largest stride*k+1 at or under it."""
        cap = min(self.spec.sampling.frames, self.limits.max_frames)
        return (cap - 1) // self.stride * self.stride + 1

    def max_seconds(self, fps: int | None = None) -> float:
        return (self.limits.max_frames - 1) / (fps or self.fps)

    def capabilities(self) -> dict[str, Any]:
        s = self.spec.sampling
        return {"sizes": self.sizes(), "max_pixels": self.limits.max_pixels,
                "size_multiple": self.spec.spatial_multiple,
                "fps": s.fps, "frames": self.frame_counts(), "default_frames": self.default_frames(),
                "default_size": "x".join(map(str, self.default_size() or ())) or None,
                "max_seconds": round(self.max_seconds(), 3), "steps": s.steps, "max_steps": self.limits.max_steps,
                "guidance": s.guidance_high_noise, "guidance_low_noise": s.guidance_low_noise,
                "experts": 1 if s.boundary is None else 2, "shift": s.shift, "scheduler": s.scheduler,
                "schedulers": list(SOLVERS), "output_formats": ["mp4", "webm"], "image_input": image_input(self.spec),
                "negative_prompt": s.negative_prompt}

    def _can(self) -> str:
        return (f"{self.spec.name} here makes {' or '.join(self.sizes()) or 'no listed size'} (other multiples of "
                f"{self.spec.spatial_multiple} with an area up to {self.limits.max_pixels} pixels), up to "
                f"{self.limits.max_frames} frames at {self.fps} fps ({self.max_seconds():g} s)")

    # -- requests ----------------------------------------------------------------------------------

    def parse(self, fields: dict[str, Any]) -> CreateVideoRequest:
        try:
            return CreateVideoRequest.model_validate(fields)
        except ValidationError as exc:
            raise ApiError(400, *validation_message(exc.errors())) from None

    def to_job(self, fields: dict[str, Any], image: bytes | None = None) -> tuple[JobRequest, Settings, dict[str, Any]]:
        """A create request (JSON or form fields, image = input_reference's bytes) -> the job, its settings,
        and what the client asked for as it asked (echoed in the Video object)."""
        body = self.parse(fields)
        if image is not None and not image_input(self.spec):
            raise ApiError(400, f"input_reference: {self.spec.name} makes video from text only (no image-to-video); "
                                f"send the request without input_reference", "input_reference", "image_unsupported")
        if image is None and self.spec.image is not None and self.spec.image.required:
            raise ApiError(400, f"{self.spec.name} is an image-to-video model: send the first frame as "
                                f"input_reference", "input_reference", "image_required")
        if body.model is not None and body.model not in self.names:
            raise ApiError(400, f"model {body.model!r} is not served here; this server runs {self.spec.name!r} "
                                f"(leave model out, or send {self.spec.name!r})", "model", "model_not_found")
        if body.seconds is not None and body.frames is not None:
            raise ApiError(400, "give seconds or frames, not both", "seconds")
        frames = body.frames
        if body.seconds is not None:
            frames = self._frames_of(body.seconds, body.fps)
        values = body.model_dump(exclude={"model", "seconds"}, exclude_none=True)
        if frames is None and self.spec.sampling.frames > self.limits.max_frames:
            frames = self.default_frames()  # --max-frames under the model's default: the cap's length
        values["frames"] = frames
        default = self.spec.sampling.sizes[0]
        if body.size is None and default[0] * default[1] > self.limits.max_pixels:
            size = self.default_size()  # --max-size under the model's default size (an image keeps this size)
            if size is not None:
                values["size"] = f"{size[0]}x{size[1]}"
        if image is not None:
            values["image"] = str(self._keep_image(image))
        if body.loras:
            values["loras"] = [self._server_lora(v) for v in body.loras]
        try:
            job = JobRequest.from_dict(values, where="request").seeded()  # a retry after a worker died: same seed
            settings = job.settings(self.spec)
        except UsageError as exc:
            if "image" in values and f"--image {values['image']}" in str(exc):
                # vidrt.image's one-line refusals (unreadable, CMYK, 16-bit, animated...), without the server's path
                raise ApiError(400, str(exc).replace(f"--image {values['image']}", "input_reference"),
                               "input_reference", "image_invalid") from None
            param = next((f for f in ("size", "frames", "steps", "width", "height", "guidance", "shift", "scheduler")
                          if f in str(exc)), None)
            raise ApiError(400, f"{exc}; {self._can()}" if param in ("size", "width", "height", "frames") else str(exc),
                           "size" if param in ("width", "height") else param) from None
        if settings.width * settings.height > self.limits.max_pixels:
            raise ApiError(400, f"size {settings.width}x{settings.height} is over this server's limit; {self._can()}",
                           "size", "size_unsupported")
        if settings.num_frames > self.limits.max_frames:
            asked = f"seconds {body.seconds} is {settings.num_frames} frames" if body.seconds else \
                f"{settings.num_frames} frames is"
            raise ApiError(400, f"{asked}, over this server's limit of {self.limits.max_frames} frames; {self._can()}",
                           "seconds" if body.seconds else "frames", "length_unsupported")
        if settings.steps > self.limits.max_steps:
            raise ApiError(400, f"{settings.steps} steps is over this server's limit of {self.limits.max_steps}",
                           "steps")
        asked = {k: v for k, v in (("seconds", body.seconds), ("size", body.size)) if v is not None}
        return job, settings, asked

    def _keep_image(self, data: bytes) -> Path:
        """Store input_reference's bytes as `<image_dir>/input-<sha256[:32]>` (written whole, then renamed)."""
        import hashlib
        import os
        import tempfile

        folder = self.image_dir or Path(tempfile.gettempdir()) / "vidrt-inputs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"input-{hashlib.sha256(data).hexdigest()[:32]}"
        if not path.is_file():
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path
    def _server_lora(self, value: str) -> str:
        """A client names a LoRA by its file name inside the operator's --lora-dir, never by a path: a
        server must not open files a client chooses. "NAME[:STRENGTH]" or "dit_high=NAME[:STRENGTH]"."""
        if self.lora_dir is None:
            raise ApiError(400, "loras: this server takes no LoRAs (its operator can allow the files in a folder "
                                "with `vidrt serve --lora-dir DIR`)", "loras", "loras_unsupported")
        expert, sep, rest = value.partition("=")
        if not (sep and expert in ("dit_high", "dit_low")):
            expert, rest = "", value
        name, colon, strength = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise ApiError(400, f"loras: {value!r} must name a file of the server's LoRA folder (a bare name "
                                f"like style.safetensors:0.8), not a path", "loras", "lora_not_found")
        try:  # checked here, on the bare name: a refusal later would carry the server's path
            parsed = parse_lora_arg(rest, "loras")
        except UsageError as exc:
            raise ApiError(400, str(exc), "loras", "lora_invalid") from None
        if colon and (parsed[0] != name or not math.isfinite(parsed[1])):  # ":abc", ":nan" read as part of the name
            raise ApiError(400, f"loras: {value!r}: strength {strength!r} is not a number; write it like "
                                f"{name}:0.8 (-10..10, 1.0 = as trained)", "loras", "lora_invalid")
        path = self.lora_dir / name
        if not path.is_file():
            known = sorted(p.name for p in self.lora_dir.glob("*.safetensors"))[:20]
            raise ApiError(400, f"loras: {name!r} is not in this server's LoRA folder; it has "
                                f"{', '.join(known) or 'no .safetensors files'}", "loras", "lora_not_found")
        self._check_lora_file(name, path)
        return f"{expert}={path}{colon}{strength}" if expert else f"{path}{colon}{strength}"

    def _check_lora_file(self, name: str, path: Path) -> None:
        """Read the file as `vidrt run --lora` does (not safetensors, truncated, NaN/Inf values) at create
        time, named as the client named it; each version of a file (mtime, size) is read once."""
        st = path.stat()
        key = (name, st.st_mtime_ns, st.st_size)
        if key not in self._lora_checked:
            try:
                read_lora(path, f"loras: {name!r}")
                self._lora_checked[key] = None
            except UsageError as exc:
                self._lora_checked[key] = str(exc)
        refusal = self._lora_checked[key]
        if refusal is not None:
            raise ApiError(400, refusal, "loras", "lora_invalid")

    def _frames_of(self, seconds: str, fps: int | None) -> int:
        value = float(seconds)
        rate = fps or self.fps
        frames = self.stride * round(value * rate / self.stride) + 1
        if value <= 0:
            raise ApiError(400, f"seconds {seconds} must be more than 0; {self._can()}", "seconds")
        return frames

    # -- responses ---------------------------------------------------------------------------------

    def video(self, job: Any) -> Video:
        """A scaleout.Job as the OpenAI Video object. A cancelled job is status "failed" with error code
        "cancelled" (the SDK's status values are queued, in_progress, completed, failed)."""
        s = job.settings
        fps = job.request.fps or self.fps
        event = job.event if job.status == "in_progress" else None
        error = VideoError(code=job.error_code or job.status, message=job.error) if job.error \
            else None
        status = job.status
        if status == "cancelled":
            status, error = "failed", VideoError(code="cancelled", message="the job was cancelled")
        done = job.completed_at if job.done.is_set() and job.completed_at else None
        return Video(id=job.id, created_at=int(job.created_at), completed_at=int(done) if done else None,
                     expires_at=int(math.ceil(job.expires_at)) if job.expires_at else None, status=status,
                     progress=int(math.floor(job.percent)), model=self.spec.name, prompt=job.request.prompt,
                     seconds=job.api.get("seconds") or f"{s.num_frames / fps:g}",
                     size=job.api.get("size") or f"{s.width}x{s.height}", error=error, frames=s.num_frames,
                     output_format=job.request.output_format, stage=event.stage if event else None,
                     step=event.done if event else None, steps=event.total if event else None,
                     eta_seconds=round(event.eta_seconds, 1) if event and event.eta_seconds is not None else None,
                     attempts=job.attempts, stats=job.result.get("stats") if job.result else None)


def validation_message(errors: Any) -> tuple[str, str | None]:
    """The first of pydantic's / FastAPI's validation errors as one line and the field it is about."""
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field; fields are {', '.join(CreateVideoRequest.model_fields)}, input_reference"
    elif first.get("type") == "missing":
        msg = "missing; it is required"
    return (f"{where}: {msg}" if where else msg), (where or None)

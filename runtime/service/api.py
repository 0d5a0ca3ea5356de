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

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from vidrt.errors import PackageError, Spelling, UsageError, spelled_as
from vidrt.image import load_image
from vidrt.lora import parse_lora_arg, read_lora
from vidrt.package.manifest import BakedLora, load_manifest
from vidrt.package.registry import ModelSpec
from vidrt.request import MAX_FRAMES, MAX_SEED, MAX_SIDE_PX, MAX_STEPS, Settings, missing_recipe_lora
from vidrt.schedulers import SOLVERS
from vidrt.service.jobs import JOB_FIELDS, JobRequest
from vidrt.video import output_format

Status = Literal["queued", "in_progress", "completed", "failed"]
# How a server's client reads vidrt's messages (vidrt.errors.arg, commands_shown, catalog): its request's fields,
# no `vidrt` command (no shell there), /v1/models for the names; at create and in the workers (JobManager).
API_FIELDS = Spelling({**JOB_FIELDS.names, "image": "input_reference"}, flags=False,
                      workers=JOB_FIELDS.workers, commands=False, catalog="GET /v1/models")


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
        # (name, expert, mtime_ns, size) -> refusal: each version of a file is checked once
        self._lora_checked: dict[tuple[str, str, int, int], str | None] = {}
        self.package = package
        self._merger: Any = None  # vidrt.lora.LoraMerger of the package, made on the first LoRA
        # what `vidrt export --lora` baked into the package (manifest baked_loras): fills a recipe's LoRA slot
        self.baked_loras: tuple[BakedLora, ...] = () if package is None else \
            load_manifest(package, verify=False).baked_loras
        self.limits = limits
        # the model as the checks before an upload is decoded see it: its image not required (it was sent)
        self._probe_spec = spec if spec.image is None or not spec.image.required else \
            replace(spec, image=replace(spec.image, required=False))
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
                "negative_prompt": s.negative_prompt, "recipes": self.recipes(), "loras": self.lora_names()}

    def recipes(self) -> list[dict[str, Any]]:
        """The recipes a request may name (`recipe`): the built-in ones and the package's own. needs_lora: it
        is made for a distillation LoRA the client must send in `loras` (without one it is refused); false
        where the package has a LoRA baked in for it, as `vidrt run` decides (missing_recipe_lora)."""
        from vidrt.package.recipes import all_recipes

        return [{"name": r.name, "description": r.description, "scheduler": r.scheduler,
                 "steps": r.steps if r.steps is not None else len(r.timesteps or ()) or self.spec.sampling.steps,
                 "guidance": r.guidance if r.guidance is not None else self.spec.sampling.guidance_high_noise,
                 "needs_lora": missing_recipe_lora(r.name, self.spec, (), baked=self.baked_loras) is not None}
                for r in all_recipes(self.spec.recipes).values() if r.expert_ok(self.spec.experts)]

    def _can(self) -> str:
        return (f"{self.spec.name} here makes {' or '.join(self.sizes()) or 'no listed size'} (other multiples of "
                f"{self.spec.spatial_multiple} with an area up to {self.limits.max_pixels} pixels), up to "
                f"{self.limits.max_frames} frames at {self.fps} fps ({self.max_seconds():g} s)")

    # -- requests ----------------------------------------------------------------------------------

    def parse(self, fields: dict[str, Any], form: bool = False) -> CreateVideoRequest:
        """JSON is typed strictly ("steps": "4" is refused: numbers are numbers); a form's fields are all
        text, so there "4" is read as the number it names."""
        try:
            return CreateVideoRequest.model_validate(fields, strict=not form)
        except ValidationError as exc:
            raise ApiError(400, *validation_message(exc.errors())) from None

    def to_job(self, fields: dict[str, Any], image: bytes | None = None,
               form: bool = False) -> tuple[JobRequest, Settings, dict[str, Any]]:
        """A create request (JSON or form fields, image = input_reference's bytes) -> the job, its settings,
        and what the client asked for as it asked (echoed in the Video object)."""
        body = self.parse(fields, form)
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
        if frames is not None and 1 <= frames <= MAX_FRAMES and (frames - 1) % self.stride:
            lo = (frames - 1) // self.stride * self.stride + 1  # the nearest valid lengths this server makes
            near = [str(n) for n in (lo, lo + self.stride) if n <= self.limits.max_frames] or \
                [str((self.limits.max_frames - 1) // self.stride * self.stride + 1)]
            raise ApiError(400, f"frames {frames} is not {self.stride}k+1; use {' or '.join(near)}; {self._can()}",
                           "frames", "length_unsupported")
        if body.size is not None:
            self._check_size_multiple(body.size)
        default = self.spec.sampling.sizes[0]
        if body.size is None and default[0] * default[1] > self.limits.max_pixels:
            size = self.default_size()  # --max-size under the model's default size (an image keeps this size)
            if size is not None:
                values["size"] = f"{size[0]}x{size[1]}"
        fmt = output_format(f"clip.{body.output_format}")
        if body.crf == 0 and fmt.crf_range is not None and fmt.crf_range[0] == 1:  # check_crf's refusal, worded
            # for this API: its other way to exact frames (a PNG folder) is not one this server makes
            raise ApiError(400, f"crf 0 is lossless H.264, which exists only in the High 4:4:4 Predictive "
                                f"profile that browsers do not play; send crf {fmt.crf_range[0]}..{fmt.crf_range[1]} "
                                f"(18 looks lossless)", "crf", "invalid_value")
        files = [self._server_lora(v) for v in body.loras or ()]  # names checked; nothing opened yet
        if self.lora_dir is None and body.recipe is not None and \
                missing_recipe_lora(body.recipe, self.spec, (), job=True, baked=self.baked_loras) is not None:
            # the shared refusal says to add a LoRA to loras, which this server refuses: say what it can do
            raise ApiError(400, f"recipe {body.recipe} is made for a distillation LoRA sent in loras, and this server "
                                f"takes no LoRAs (its operator can allow the LoRA files of a folder); send the request "
                                f"without recipe, or with one that needs no LoRA (GET /v1/models lists them)",
                           "recipe", "invalid_value")
        if files:
            values["loras"] = [f[0] for f in files]
        # 1. the request without its image: fields, size, length, steps (a server never reads what it will
        # refuse: the upload is neither decoded nor written before these pass)
        job = self._job(values)
        settings = self._settings(job, body, self._probe_spec if image is not None else self.spec)
        if files:  # the operator's LoRA files, read only once the cheap limits passed
            for _, name, path, expert in files:
                self._check_lora_file(name, path, expert)
            self._check_twins(job)
        if image is not None:
            # 2. the image, decoded and checked in memory (CMYK, 16-bit, animated, too small or too large...),
            # then the request with it (the size follows the image's aspect); kept only once all of that passed
            try:
                pixels = load_image(image, "input_reference")
            except UsageError as exc:
                raise ApiError(400, str(exc), "input_reference", "image_invalid") from None
            settings = self._settings(job, body, self.spec, pixels)
            kept = str(self.keep_image(image))  # Settings as the worker resolves it: the file and its bytes' sha256
            job = replace(job, image=kept)
            settings = replace(settings, image=kept, image_sha256=hashlib.sha256(image).hexdigest())
        asked = {k: v for k, v in (("seconds", body.seconds), ("size", body.size)) if v is not None}
        return job, settings, asked

    def _check_size_multiple(self, size: str) -> None:
        """A size (WxH, in range) that is not a multiple of the model's spatial multiple: refused naming the
        nearest sizes this server makes (each side rounded down or up, within --max-size's pixels), not the
        shared check's per-side rounding, which may exceed the server's limit. Other bad sizes: the shared
        check's refusal."""
        m = self.spec.spatial_multiple
        w, h = (int(v) for v in size.split("x"))
        if not (w % m or h % m) or not (m <= w <= MAX_SIDE_PX and m <= h <= MAX_SIDE_PX):
            return

        def near(v: int) -> list[int]:  # v itself when it is a multiple, else the multiples either side of it
            return [n for n in (v // m * m, v // m * m + m) if n <= MAX_SIDE_PX] if v % m else [v]

        fits = [f"{a}x{b}" for a in near(w) for b in near(h) if a * b <= self.limits.max_pixels]
        use = f"use {' or '.join(fits)}" if fits else "no size near it fits this server's limit"
        raise ApiError(400, f"size {size} is not a multiple of {m} on each side (VAE stride x patch); {use}; "
                            f"{self._can()}", "size", "invalid_value")

    def _job(self, values: dict[str, Any]) -> JobRequest:
        try:
            with spelled_as(API_FIELDS):
                return JobRequest.from_dict(values, where="request").seeded()  # a retry after a worker died: same seed
        except UsageError as exc:
            raise self._refusal(exc) from None

    def _refusal(self, exc: UsageError) -> ApiError:
        """A refusal of the checks shared with `vidrt run` as a 400 naming the field (and, for a size or a
        length, what this server makes)."""
        message, param = api_text(str(exc))
        return ApiError(400, f"{message}; {self._can()}" if param in ("size", "frames") else message, param,
                        "invalid_value")

    def _settings(self, job: JobRequest, body: CreateVideoRequest, spec: ModelSpec,
                  image: Any = None) -> Settings:
        """The job's settings against `spec` (image: the decoded upload), then this server's limits."""
        try:
            with spelled_as(API_FIELDS):
                settings = job.settings(spec, baked=self.baked_loras, image=image)
        except UsageError as exc:
            raise self._refusal(exc) from None
        if settings.width * settings.height > self.limits.max_pixels:
            raise ApiError(400, f"size {settings.width}x{settings.height} is over this server's limit; {self._can()}",
                           "size", "size_unsupported")
        if settings.num_frames > self.limits.max_frames:
            asked = f"seconds {body.seconds} is {settings.num_frames} frames," if body.seconds else \
                f"frames {settings.num_frames} is"
            raise ApiError(400, f"{asked} over this server's limit of {self.limits.max_frames} frames; {self._can()}",
                           "seconds" if body.seconds else "frames", "length_unsupported")
        if settings.steps > self.limits.max_steps:
            what = f"steps {settings.steps} is" if body.steps is not None else \
                f"recipe {body.recipe} runs {settings.steps} steps," if body.recipe else \
                f"the default of {settings.steps} steps is"
            raise ApiError(400, f"{what} over this server's limit of {self.limits.max_steps} steps; send steps "
                                f"{self.limits.max_steps} or fewer", "steps", "steps_unsupported")
        return settings

    def keep_image(self, data: bytes) -> Path:
        """Store input_reference's bytes as `<image_dir>/input-<sha256[:32]>` (written whole, then renamed);
        the same image is stored once. Called only once the request passed every check (to_job)."""
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

    def _server_lora(self, value: str) -> tuple[str, str, Path, str | None]:
        """A client names a LoRA by its file name inside the operator's --lora-dir, never by a path: a
        server must not open files a client chooses. "NAME[:STRENGTH]" or "dit_high=NAME[:STRENGTH]" ->
        (the job's "PATH[:STRENGTH]" value, NAME, PATH, expert or None); the file is only stat'ed here."""
        if self.lora_dir is None:
            raise ApiError(400, "loras: this server takes no LoRAs (its operator can allow the LoRA files of a "
                                "folder); send the request without loras", "loras", "loras_unsupported")
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
        if not name.lower().endswith(".safetensors") or not path.is_file():  # nothing else there is opened
            raise ApiError(400, f"loras: {name!r} is not in this server's LoRA folder; it has "
                                f"{', '.join(self.lora_names()[:20]) or 'no .safetensors files'}", "loras",
                           "lora_not_found")
        job_value = f"{expert}={path}{colon}{strength}" if expert else f"{path}{colon}{strength}"
        return job_value, name, path, expert or None

    def lora_label(self, path: str) -> str:
        """A LoRA of --lora-dir as the client named it (its bare name), never by the server's path."""
        return f"loras: {Path(path).name!r}"

    def _check_twins(self, job: Any) -> None:
        """The same file given twice (or two byte-identical files) is refused now, as the worker would refuse
        it (LoraMerger.applied), named by the client's names; the recipe's own LoRA given again is allowed."""
        merger = self._lora_merger()
        if merger is None:
            return
        try:
            with spelled_as(API_FIELDS):
                merger.applied(job.settings(self.spec, lora_label=self.lora_label, baked=self.baked_loras).loras)
        except UsageError as exc:
            raise ApiError(400, api_text(str(exc))[0], "loras", "lora_invalid") from None

    def lora_names(self) -> list[str]:
        """The LoRA files a request may name: the *.safetensors files of --lora-dir, by name."""
        if self.lora_dir is None:
            return []
        return sorted(p.name for p in self.lora_dir.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))

    def _check_lora_file(self, name: str, path: Path, expert: str | None = None) -> None:
        """At create time, named as the client named it: the file's keys and shapes against the DiT of every
        expert it applies to, from its header alone (another architecture, another size: LoraMerger.check_header),
        then its values as `vidrt run --lora` reads them (truncated, NaN/Inf), only once the header passed.
        Each version of a file (mtime, size) is checked once per expert choice."""
        from vidrt.lora import LoraRef

        st = path.stat()
        key = (name, expert or "", st.st_mtime_ns, st.st_size)
        if key not in self._lora_checked:
            label = f"loras: {name!r}"
            try:
                merger = self._lora_merger()
                with spelled_as(API_FIELDS):  # its refusals name the client's fields (loras), no CLI flag
                    if merger is not None:
                        for each in merger.manifest.model.experts:
                            merger.check_header(each, LoraRef(str(path), 1.0, expert, label=label))
                    read_lora(path, label)
                self._lora_checked[key] = None
            except UsageError as exc:
                self._lora_checked[key] = str(exc)
            except PackageError:  # a package exported before vidrt recorded its DiT layout (no server path here)
                raise ApiError(400, "loras: this server's model package predates LoRA support, so it takes no "
                                    "LoRAs; send the request without loras", "loras", "loras_unsupported") from None
        refusal = self._lora_checked[key]
        if refusal is not None:
            raise ApiError(400, refusal, "loras", "lora_invalid")

    def _lora_merger(self) -> Any:
        """The package's LoraMerger (its DiT weight layout), for the key/shape check; None without a package."""
        if self._merger is None and self.package is not None:
            from vidrt.lora import LoraMerger

            self._merger = LoraMerger(Path(self.package), load_manifest(self.package, verify=False), lambda s: None)
        return self._merger

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
        error = VideoError(code=job.error_code or job.status, message=api_text(job.error)[0]) if job.error \
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


# The API's fields that a refusal of the shared checks (vidrt.request, run under spelled_as(API_FIELDS)) may
# name first: that field is the error's `param` (width/height: size).
_FIELD = re.compile(r"\b(" + "|".join(sorted({"steps", "size", "frames", "guidance", "guidance_low_noise", "shift",
                                               "seed", "scheduler", "cache", "recipe", "fps", "crf",
                                               "negative_prompt", "loras", "prompt", "width", "height"},
                                              key=len, reverse=True)) + r")\b")


def api_text(message: str) -> tuple[str, str | None]:
    """A refusal of the checks shared with `vidrt run` as the API returns it: (message, param), param = the
    request field the message names first. The message is already worded for the client (the checks run
    under spelled_as(API_FIELDS), at create and in the workers: its fields, no `vidrt` command, GET
    /v1/models for the names)."""
    first = _FIELD.search(message)
    param = None if first is None else "size" if first[1] in ("width", "height") else first[1]
    return message, param


def validation_message(errors: Any) -> tuple[str, str | None]:
    """The first of pydantic's / FastAPI's validation errors as one line, in plain words, and the field it is
    about."""
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    kind, value = first.get("type", ""), first.get("input")
    shown = json.dumps(value)[:40] if isinstance(value, (str, int, float, bool)) or value is None else "that"
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    spec = CreateVideoRequest.model_fields.get(where)
    if kind == "extra_forbidden":
        msg = f"unknown field; fields are {', '.join(CreateVideoRequest.model_fields)}, input_reference"
    elif kind == "missing":
        msg = "missing; it is required"
    elif isinstance(value, float) and not math.isfinite(value):
        msg = f"must be a finite number, got {value}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {"greater_than_equal": "at least ", "less_than_equal": "at most ", "greater_than": "more than ",
                 "less_than": "less than "}[kind] + _num(next(iter(first.get("ctx", {}).values()), 0))
        msg = f"{shown} is out of range; use {_range_text(spec) if spec is not None else bound}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        msg = f"must be an integer, got {shown}"
    elif kind in ("float_type", "float_parsing"):
        msg = f"must be a number, got {shown}"
    elif kind in ("string_type", "literal_error") and value is not None and not isinstance(value, str):
        msg = f"must be a string, got {shown}"
    elif kind == "string_pattern_mismatch":
        msg = _PATTERN_HINT.get(where, f"{shown} is not valid")
        msg = msg.format(shown=shown)
    elif kind == "string_too_short" and where == "prompt":
        return "prompt is empty; describe the clip", "prompt"
    elif kind == "literal_error":
        msg = f"{shown} is not one of {first.get('ctx', {}).get('expected', '')}"
    return (f"{where}: {msg}" if where else msg), (where or None)


_PATTERN_HINT = {"size": "{shown} is not WIDTHxHEIGHT; write it like 832x480",
                 "seconds": "{shown} is not a length in seconds; write it like 4 or 2.5",
                 "cache": "{shown} is not METHOD[:THRESHOLD]; write it like teacache or teacache:0.1"}


def _range_text(spec: Any) -> str:
    """A field's bounds (its annotated_types Ge/Gt/Le metadata) as "1..1000" or "more than 0, up to 100"."""
    lo = next((("", m.ge) for m in spec.metadata if getattr(m, "ge", None) is not None),
              next((("more than ", m.gt) for m in spec.metadata if getattr(m, "gt", None) is not None), None))
    hi = next((m.le for m in spec.metadata if getattr(m, "le", None) is not None), None)
    if lo is not None and not lo[0] and hi is not None:
        return f"{_num(lo[1])}..{_num(hi)}"
    parts = [f"{lo[0] or 'at least '}{_num(lo[1])}" if lo else "", f"up to {_num(hi)}" if hi is not None else ""]
    return ", ".join(p for p in parts if p)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"

"""The one job contract shared by `vidrt run`, `vidrt batch` and `vidrt serve`.

    job = JobRequest.from_dict({"prompt": "a red circle", "size": "64x64", "steps": 4}, where="line 3")
    settings = job.settings(pipe.manifest.model)          # every default filled in, UsageError if invalid
    result = execute_job(pipe, job, "out/clip.mp4", on_event=print, should_stop=flag.is_set)
    result.to_dict()                                       # settings + per-stage seconds: the stats JSON

A job is a `Request` plus what the file needs (format, fps, CRF). `execute_job` writes the clip
atomically through `VideoWriter` (a temp beside the output, renamed when complete) and reports
`ProgressEvent`s: stage, step i/N, percent and ETA. Cancellation: `should_stop` is polled at every
progress point of `Pipeline.run` (after each denoising step and each decoded chunk) and raises
`Cancelled` from the progress callback, so the pipeline unwinds the way it does on any error: the
video writer drops its temp and nothing is published. No ray, no torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidrt.errors import Cancelled, Spelling, UsageError, spelled_as
from vidrt.lora.merge import parse_lora_arg
from vidrt.package.recipes import LoraRef
from vidrt.package.registry import ModelSpec
from vidrt.request import Request, Settings, missing_recipe_lora, resolve
from vidrt.video import (
    check_crf,
    clip_metadata,  # noqa: F401  (re-exported: the job contract writes the same metadata)
    output_format,
)

if TYPE_CHECKING:
    import numpy as np
    from vidrt.package.manifest import BakedLora

FORMATS = {"mp4": ".mp4", "webm": ".webm", "png": ""}  # output_format -> suffix ("" = a PNG frame folder)

# Share of the bar each stage fills: denoising is where the time goes, decoding the rest.
_STAGE_SPAN = {"denoise": (0.0, 90.0), "decode": (90.0, 100.0)}


# Messages about a job name its JSON fields (vidrt.errors.arg), not `vidrt run`'s flags or Python's keywords.
JOB_FIELDS = Spelling({"num_frames": "frames", "width": "size", "height": "size", "lora": "loras",
                       "lora_high_noise": "loras", "lora_low_noise": "loras"}, flags=False,
                      workers={"backend": "backend", "device": "device", "threads": "thread count",
                               "vae_memory": "VAE memory budget"})


@dataclass(frozen=True)
class JobRequest:
    """One clip to make. None = the model's default. Field names are the JSON keys of jobs.jsonl."""

    prompt: str
    model: str | None = None  # package path or model name; must match what the worker serves
    negative_prompt: str | None = None
    size: str | None = None  # "WIDTHxHEIGHT"
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_low_noise: float | None = None  # two-expert models (A14B): the low-noise expert's scale
    shift: float | None = None
    seed: int | None = None  # None or -1: a random one, drawn once per clip (seeded()) and written in its metadata
    scheduler: str | None = None
    recipe: str | None = None  # a named recipe (vidrt info lists them); the fields above override it
    loras: tuple[str, ...] | None = None  # "FILE[:STRENGTH]" on the worker's disk (A14B: "dit_high=FILE[:S]")
    cache: str | None = None  # step caching "METHOD[:THRESHOLD]" (vidrt.caching), like `vidrt run --cache`
    output_format: str = "mp4"  # mp4 | webm | png
    fps: int | None = None
    crf: int | None = None
    image: str | None = None  # image-to-video: the first frame's image file (serve: the uploaded input_reference)

    @classmethod
    def from_dict(cls, data: Any, where: str = "request", extra_fields: tuple[str, ...] = ()) -> JobRequest:
        """Type-check a JSON object; one-line UsageError naming `where` and the field. `extra_fields`:
        keys the caller has already taken out (named in the unknown-field message)."""
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: expected a JSON object like {{\"prompt\": \"a cat\"}}, "
                             f"got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join([*known, *extra_fields])}")
        if "prompt" not in data:
            raise UsageError(f"{where}: missing \"prompt\"")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if value is None and name != "prompt":
                continue
            values[name] = _check_type(name, value, where)
        if not values["prompt"].strip():
            raise UsageError(f"{where}: \"prompt\" is empty")
        if values.get("output_format", "mp4") not in FORMATS:
            raise UsageError(f"{where}: output_format {values['output_format']!r} is not one of "
                             f"{', '.join(FORMATS)}")
        job = cls(**values)
        try:
            job.size_px()  # malformed sizes fail here, with the field named
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        return job

    def to_dict(self) -> dict[str, Any]:
        """The non-default fields (what a jobs.jsonl line would hold)."""
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "output_format" and v == "mp4")
}

    def size_px(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        parts = self.size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 5 for p in parts):
            raise UsageError(f"size {self.size!r} is not WIDTHxHEIGHT; write it like 832x480")
        return int(parts[0]), int(parts[1])

    def seeded(self) -> JobRequest:
        """This job with a concrete seed (a random one drawn now if seed is None or -1)."""
        return replace(self, seed=self.to_request().seeded().seed)

    def to_request(self, lora_label: Callable[[str], str] | None = None) -> Request:
        """lora_label(path) -> how messages name that LoRA file (LoraRef.label); None: "LoRA PATH"."""
        wh = self.size_px()
        return Request(prompt=self.prompt, negative_prompt=self.negative_prompt, width=wh[0] if wh else None,
                       height=wh[1] if wh else None, num_frames=self.frames, steps=self.steps,
                       guidance=self.guidance, guidance_low_noise=self.guidance_low_noise, shift=self.shift,
                       seed=self.seed, scheduler=self.scheduler, recipe=self.recipe,
                       loras=tuple(lora_ref(x, lora_label) for x in self.loras or ()), image=self.image,
                       cache=self.cache)

    def settings(self, spec: ModelSpec, loras: Sequence[LoraRef] = (),
                 lora_label: Callable[[str], str] | None = None, baked: Sequence[BakedLora] = (),
                 image: np.ndarray | None = None) -> Settings:
        """Resolve against the model (defaults, ranges, multiples); also checks fps and CRF. loras: the
        worker pipeline's own LoRAs (Pipeline.loras), listed first in Settings.loras as the run applies them.
        lora_label: how the job's LoRA files are named in messages (to_request). baked: the package's
        manifest `baked_loras` (`vidrt export --lora`), which fill a recipe's LoRA slot as in `vidrt run`.
        image: the start image already decoded (uint8 [H, W, 3], `vidrt serve`'s upload before it is kept),
        used instead of reading `self.image` (Settings.image is then "array WxH")."""
        if self.fps is not None and not 1 <= self.fps <= 240:
            raise UsageError(f"fps {self.fps} is out of range; use 1..240")
        check_crf(output_format(f"clip{self.suffix}" if self.suffix else "frames/"), self.crf, "crf")
        request = self.to_request(lora_label)
        settings = resolve(request if image is None else replace(request, image=image), spec, loras=loras)
        missing = missing_recipe_lora(settings.recipe, spec, settings.loras, job=True, baked=baked)
        if missing is not None:  # as `vidrt run` refuses it: a distillation recipe without its LoRA makes noise
            raise UsageError(missing)
        return settings

    @property
    def suffix(self) -> str:
        return FORMATS[self.output_format]

    def key(self, package: str | None = None) -> str:
        """A stable name for this request's clip (same request -> same key): resumable batch outputs.
        package: the model package's identity (package_identity): another package, a baked one that keeps
        the model's name included, is another request. A LoRA or a start image is its file's contents, not
        only its name: a changed file (same path) is another request."""
        record: dict[str, Any] = {k: v for k, v in asdict(self).items() if k != "model"}  # a name or a path
        record["package"] = package
        if self.loras:
            record["lora_sha256"] = [file_sha256(lora_ref(x).path) for x in self.loras]
        if self.image is not None:
            record["image_sha256"] = file_sha256(self.image)
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def package_identity(package: str | os.PathLike[str]) -> str:
    """What makes a model package's clips what they are, as one sha256 (hex): its manifest.json (every
    graph's and weight file's sha256, the model's defaults, baked LoRAs, recipes, cache tables) without
    `engines` (TensorRT engines built later from the same graphs) and `export_inputs` (the export's
    bookkeeping: its checkpoint files' mtimes, which differ between two copies of one checkpoint while the
    graphs are byte-identical). A package re-exported or baked from another checkpoint or LoRA has another
    identity even where it keeps the model's name."""
    try:
        manifest = json.loads((Path(package) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable"  # the package's own checks name that, before any job runs
    if isinstance(manifest, dict):
        manifest.pop("engines", None)
        manifest.pop("export_inputs", None)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256: each version hashed once


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """A file's sha256 (hex), remembered per path, size and modification time; None if it cannot be read
    (the job's own checks name that)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            _DIGESTS[key] = digest.hexdigest()
    except OSError:
        return None
    return _DIGESTS[key]


_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "model": (str,), "negative_prompt": (str,), "size": (str,), "scheduler": (str,),
    "output_format": (str,), "image": (str,), "frames": (int,), "steps": (int,), "seed": (int,), "fps": (int,),
    "crf": (int,), "cache": (str,),
    "guidance": (int, float), "guidance_low_noise": (int, float), "shift": (int, float),
    "recipe": (str,), "loras": (list, tuple),
}


def lora_ref(value: str, label: Callable[[str], str] | None = None) -> LoraRef:
    """"FILE[:STRENGTH]", or "EXPERT=FILE[:STRENGTH]" for one expert of A14B (dit_high / dit_low).
    label(FILE): how messages name the file (LoraRef.label)."""
    expert, sep, rest = value.partition("=")
    if not (sep and expert in ("dit_high", "dit_low")):
        expert, rest = None, value
    path, strength = parse_lora_arg(rest, "loras")
    return LoraRef(path, strength, expert=expert, label=label(path) if label else None)


def _check_type(name: str, value: Any, where: str) -> Any:
    kinds = _TYPES[name]
    if name == "loras":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{where}: loras must be a list of \"FILE[:STRENGTH]\" strings, "
                             f"got {json.dumps(value)[:40]}")
        for v in value:
            try:
                lora_ref(v)  # malformed entries fail here, with the field named
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "a string" if kinds == (str,) else "an integer" if kinds == (int,) else "a number"
        raise UsageError(f"{where}: {name} must be {want}, got {json.dumps(value)[:40]}")
    if float in kinds:
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: {name} must be a finite number")
    if isinstance(value, int) and abs(value) > 2**63 - 1:
        raise UsageError(f"{where}: {name} {value} is out of range")
    return value


@dataclass(frozen=True)
class ProgressEvent:
    """stage: "text" | "denoise" | "decode" | "done"; done/total count steps or frames of that stage."""

    stage: str
    done: int
    total: int
    percent: float  # of the whole job, 0..100
    elapsed_seconds: float
    eta_seconds: float | None  # None until there is something to extrapolate from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProgressTracker:
    """Turns Pipeline.run's (stage, done, total) calls into ProgressEvents; raises Cancelled on request."""

    def __init__(self, on_event: Callable[[ProgressEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.on_event = on_event
        self.should_stop = should_stop
        self.t0 = time.monotonic()
        self.last = ProgressEvent("text", 0, 1, 0.0, 0.0, None)

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("the job was cancelled")

    def __call__(self, stage: str, done: int, total: int) -> None:
        lo, hi = _STAGE_SPAN.get(stage, (0.0, 100.0))
        percent = lo + (hi - lo) * done / max(total, 1)
        elapsed = time.monotonic() - self.t0
        eta = elapsed * (100.0 - percent) / percent if percent > 0 else None
        self.emit(ProgressEvent(stage, done, total, percent, elapsed, eta))
        self.check()

    def emit(self, event: ProgressEvent) -> None:
        self.last = event
        if self.on_event is not None:
            self.on_event(event)


@dataclass
class JobResult:
    path: Path
    settings: Settings
    stats: dict[str, Any]
    fps: int
    model: str

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.path), "model": self.model, "fps": self.fps,
                "settings": asdict(self.settings), "stats": self.stats}


def execute_job(pipe: Any, job: JobRequest, output: str | os.PathLike[str], *,
                on_event: Callable[[ProgressEvent], None] | None = None,
                should_stop: Callable[[], bool] | None = None, overwrite: bool = False,
                vae_memory_bytes: int | None = None, keep_text_encoder: bool = True,
                lora_label: Callable[[str], str] | None = None, spelling: Spelling = JOB_FIELDS) -> JobResult:
    """Run one job on a loaded Pipeline and publish its file atomically. Raises UsageError for a
    request the model cannot run, Cancelled when should_stop() turns true (nothing is written).
    lora_label(path): how the job's LoRA files are named in its error messages (JobRequest.to_request).
    spelling: how its messages name things (vidrt.errors): the job's fields (JOB_FIELDS: a batch line), or
    the front end's own (`vidrt serve`: vidrt.service.api.API_FIELDS, no `vidrt` command for its client)."""
    from vidrt.video import VideoWriter

    spec = pipe.manifest.model
    with spelled_as(spelling):  # its messages name the job's fields (frames, size, loras...)
        job = job.seeded()  # the metadata written below and the run use the same seed
        # every LoRA the run applies, the worker's own first; a LoRA baked into the package fills a recipe's slot
        settings = job.settings(spec, pipe.loras, lora_label, baked=pipe.manifest.baked_loras)
        settings = replace(settings, loras=pipe.applied_loras(settings.loras))  # each file once, none baked twice
        fps = job.fps or spec.sampling.fps
        tracker = ProgressTracker(on_event, should_stop)
        tracker.check()
        with VideoWriter(output, fps=fps, crf=job.crf, metadata=clip_metadata(settings, spec.name),
                         overwrite=overwrite) as writer:
            result = pipe.run(job.to_request(lora_label), on_frames=writer.write, progress=tracker,
                              vae_memory_bytes=vae_memory_bytes, keep_text_encoder=keep_text_encoder)
            tracker.check()  # last chance before the file is published
    tracker.emit(ProgressEvent("done", 1, 1, 100.0, time.monotonic() - tracker.t0, 0.0))
    return JobResult(path=writer.path, settings=settings, stats=result.stats.to_dict(), fps=fps, model=spec.name)

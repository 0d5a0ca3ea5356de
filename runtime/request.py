"""The generation request, checked against the model before any work starts."""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from vidrt.caching import parse_cache
from vidrt.errors import UsageError, arg, flags_shown
from vidrt.package.recipes import LoraRef, Recipe, all_recipes, find_recipe
from vidrt.package.registry import ModelSpec
from vidrt.schedulers import SOLVERS
from vidrt.text import check_prompt, clean_prompt

if TYPE_CHECKING:
    from vidrt.package.manifest import BakedLora

MAX_STEPS = 1000
MAX_FRAMES = 1001
MAX_SIDE_PX = 4096
MAX_SEED = 2**63 - 1
RANDOM_SEED = -1  # as the official generate.py: --seed -1 (or no seed) = a random one
RANDOM_SEEDS = 2**32  # a drawn seed is below this: short enough to read off and retype


def draw_seed() -> int:
    """A random seed in 0..2**32-1 (what `seed=None` / `-1` becomes; reported in Settings.seed)."""
    return secrets.randbelow(RANDOM_SEEDS)


# Field -> the types it accepts (None is accepted wherever the field's default is None). One table:
# a new Request field adds one row (tests/test_inputs.py fails for a field without one). numbers.Integral
# takes numpy integers, numbers.Real numpy floats and ints; both are stored as plain int / float.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str,), "scheduler": (str,),
    "width": (numbers.Integral,), "height": (numbers.Integral,), "num_frames": (numbers.Integral,),
    "steps": (numbers.Integral,), "seed": (numbers.Integral,),
    "guidance": (numbers.Real,), "guidance_low_noise": (numbers.Real,), "shift": (numbers.Real,),
    "timesteps": (tuple,), "recipe": (str,), "loras": (tuple,),  # items checked in Request.__post_init__
    "image": (str, Path, np.ndarray), "last_image": (str, Path, np.ndarray),  # read by vidrt.image.load_image
    "cache": (str,),
}
_KIND = {str: "a string", numbers.Integral: "an integer", numbers.Real: "a number"}
def check_field_types(obj: Any, table: dict[str, tuple[type, ...]], where: str) -> None:
    """Check (and normalise: numpy scalars -> int/float) a frozen dataclass's fields against `table`.
    Raises UsageError `<where>: <field> must be <kind>, got <value> (<type>)`."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        kinds = table[f.name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            want = " or ".join(_KIND.get(k, k.__name__) for k in kinds)
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise UsageError(f"{where}: {f.name} must be {want}, got {shown} ({type(value).__name__})")
        if kinds == (numbers.Integral,):
            object.__setattr__(obj, f.name, int(value))
        elif kinds == (numbers.Real,):
            if not math.isfinite(value):
                raise UsageError(f"{where}: {arg(f.name)} must be a finite number, got {value}")
            object.__setattr__(obj, f.name, float(value))


@dataclass(frozen=True)
class Request:
    """Everything that decides the clip. None = the model's default (from its manifest); seed None or -1 =
    a random seed, drawn once (`seeded()`) and reported in Settings.seed. Every field is type-checked
    when the Request is made (FIELD_TYPES): a wrong type is a one-line UsageError naming the field."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance: float | None = None  # the CFG scale; on two-expert models the high-noise expert's (and the
    #                                low-noise one's too unless guidance_low_noise is given); None = default
    guidance_low_noise: float | None = None  # two-expert models (Wan2.2 A14B) only: the low-noise expert's scale
    shift: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    timesteps: tuple[float, ...] | None = None  # euler: the unshifted timestep list (1000, 750, 500, 250)
    recipe: str | None = None  # a named recipe (vidrt.package.recipes); the fields above override its own
    # LoRAs for this clip, on top of the recipe's and the pipeline's: LoraRef, (path, strength) or
    # "FILE[:STRENGTH]" items, as Pipeline.load(loras=) takes them (stored as LoraRef)
    loras: tuple[LoraRef, ...] = ()
    # image-to-video: a file path or a uint8 [H, W, 3] RGB array (vidrt.image.load_image); without
    # width/height the clip's size follows the image by the model's rule (vidrt.image.output_size)
    image: str | Path | np.ndarray | None = None
    last_image: str | Path | np.ndarray | None = None  # first-last-frame models (Wan2.1 FLF2V) only
    cache: str | None = None  # step caching "METHOD[:THRESHOLD]" (vidrt.caching.METHODS); None = none

    def __post_init__(self) -> None:
        check_field_types(self, FIELD_TYPES, "Request")
        if self.timesteps is not None:
            if not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in self.timesteps):
                raise UsageError(f"Request: timesteps must be numbers, got {self.timesteps!r:.60}")
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        if not all(isinstance(x, LoraRef) for x in self.loras):  # the forms Pipeline.load(loras=) takes
            from vidrt.lora import as_lora_refs

            object.__setattr__(self, "loras", as_lora_refs(self.loras))
        if self.seed is not None and not RANDOM_SEED <= self.seed <= MAX_SEED:
            raise UsageError(f"{arg('seed', self.seed)} is out of range; use 0..{MAX_SEED}, or -1 for a random one")

    def seeded(self) -> Request:
        """This request with a concrete seed: a random one drawn now if seed is None or -1. Callers that
        write the settings before running (metadata, --stats-json) resolve a seeded request, so the
        seed they record is the one the run uses."""
        return self if self.seed is not None and self.seed != RANDOM_SEED else replace(self, seed=draw_seed())


@dataclass(frozen=True)
class Settings:
    """A request with every default filled in and every value checked. prompt / negative_prompt are what
    the text encoder receives: cleaned as the official tokenizer path does (vidrt.text.clean_prompt), so
    warnings, metadata and --stats-json describe that text, not the raw input."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_high_noise: float
    guidance_low_noise: float
    shift: float
    seed: int
    scheduler: str
    timesteps: tuple[float, ...] | None = None
    recipe: str | None = None
    # every LoRA the clip is made with: the pipeline's (Pipeline.load(loras=), `vidrt run --lora`), the
    # recipe's shipped ones (package-relative), then the request's; each with its strength and expert
    loras: tuple[LoraRef, ...] = ()
    image: str | None = None  # the conditioning image: its path, or "array WxH"; None = text-to-video
    last_image: str | None = None
    cache: str = "none"  # "none" or METHOD[:THRESHOLD], checked
    # sha256 (hex) of the image file's bytes, or of an array's uint8 [H, W, 3] pixels: what the clip was
    # made from, recorded without the folder (the file's metadata names the image by file name only)
    image_sha256: str | None = None
    last_image_sha256: str | None = None


def _describe_image(source: object, pixels: np.ndarray) -> tuple[str, str]:
    """(its path or "array WxH", sha256 of the file's bytes or of the array's pixels)."""
    if isinstance(source, (str, Path)):
        return str(source), hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return f"array {pixels.shape[1]}x{pixels.shape[0]}", hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest()


def _nearest_multiple(value: int, multiple: int) -> str:
    lo = max(multiple, value // multiple * multiple)
    hi = lo + multiple
    return str(lo) if lo == value else f"{lo} or {hi}"


def _pick(given: object, recipe_value: object, default: object) -> object:
    return given if given is not None else recipe_value if recipe_value is not None else default


def resolve(request: Request, spec: ModelSpec, recipes: Mapping[str, Recipe] | None = None,
            loras: Sequence[LoraRef] = ()) -> Settings:
    """Fill defaults from the recipe (if named), then the model, and refuse values that cannot work,
    naming the nearest valid ones. recipes: name -> Recipe (default: the built-in ones and the model's
    own, `spec.recipes`). loras: the pipeline's own LoRAs (Pipeline.load(loras=), `vidrt run --lora`),
    applied before the recipe's and the request's: Settings.loras lists all of them, in that order."""
    d = spec.sampling
    request = request.seeded()
    assert request.seed is not None
    recipe = find_recipe(request.recipe, recipes if recipes is not None else all_recipes(spec.recipes)) \
        if request.recipe is not None else None
    if recipe is not None:  # the recipe's fields where the request leaves them open
        request = _apply_recipe(request, recipe, spec)
    prompt = clean_prompt(request.prompt)
    check_prompt(prompt)  # "&nbsp;" is not empty, but the model would receive nothing
    if (request.width is None) != (request.height is None):
        raise UsageError(f"give both width and height ({arg('size', 'WxH')}), or neither for the model's default "
                         f"size")
    width, height = (request.width, request.height) if request.width is not None else d.sizes[0]
    image = last_image = image_sha256 = last_image_sha256 = None
    if request.image is not None or request.last_image is not None:
        from vidrt.image import load_image, output_size

        cond = spec.image
        if cond is None:
            raise UsageError(f"{spec.name} is a text-to-video model and takes no {arg('image')}; use an image-to-video "
                             f"package (Wan2.2 TI2V-5B, Wan2.2 I2V-A14B, Wan2.1 I2V/FLF2V)")
        if request.image is None:
            raise UsageError(f"{arg('last_image')} needs {arg('image')} (the first frame)")
        if request.last_image is not None and not cond.last_image:
            raise UsageError(f"{spec.name} takes no {arg('last_image')}; first-and-last-frame needs Wan2.1 FLF2V")
        if cond.last_image and request.last_image is None:
            raise UsageError(f"{spec.name} makes a clip between two frames: pass {arg('last_image', 'END.png')} too")
        pixels = load_image(request.image)
        image, image_sha256 = _describe_image(request.image, pixels)
        if request.last_image is not None:
            last_image, last_image_sha256 = _describe_image(request.last_image,
                                                            load_image(request.last_image, arg("last_image")))
        if request.width is None:  # the official rule: the image's aspect in the default size's area
            area = d.sizes[0][0] * d.sizes[0][1]
            width, height = output_size(pixels.shape[1], pixels.shape[0], cond.resize, area, spec.spatial_multiple)
    elif spec.image is not None and spec.image.required:
        raise UsageError(f"{spec.name} is an image-to-video model: pass {arg('image', 'START.png')}")
    m = spec.spatial_multiple
    for name, v in (("width", width), ("height", height)):
        if not m <= v <= MAX_SIDE_PX:
            raise UsageError(f"{name} {v} is out of range; use {m}..{MAX_SIDE_PX} pixels ({arg('size', 'WxH')})")
        if v % m:
            raise UsageError(f"{name} {v} is not a multiple of {m} (VAE stride x patch); "
                             f"use {_nearest_multiple(v, m)}")
    frames = request.num_frames if request.num_frames is not None else d.frames
    ft = spec.vae.stride[0]
    if not 1 <= frames <= MAX_FRAMES:
        raise UsageError(f"{arg('num_frames', frames)} is out of range; use 1..{MAX_FRAMES} ({ft}k+1)")
    if (frames - 1) % ft:
        lo = (frames - 1) // ft * ft + 1
        raise UsageError(f"{arg('num_frames', frames)} is not {ft}k+1; use {lo} or {lo + ft}")
    timesteps = request.timesteps
    steps = request.steps if request.steps is not None else len(timesteps) if timesteps else d.steps
    if request.steps is None and timesteps and not len(timesteps) <= MAX_STEPS:  # the list sets the step count
        raise UsageError(f"{arg('timesteps')} has {len(timesteps)} values; give 1..{MAX_STEPS} (one per step)")
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"{arg('steps', steps)} is out of range; use 1..{MAX_STEPS}")
    shift = request.shift if request.shift is not None else d.shift
    if not (0.0 < shift <= 100.0):
        raise UsageError(f"{arg('shift', shift)} is out of range; use a value in (0, 100], e.g. {d.shift}")
    for name, g in (("guidance", request.guidance), ("guidance_low_noise", request.guidance_low_noise)):
        if g is not None and not (0.0 <= g <= 50.0):
            raise UsageError(f"{arg(name, g)} is out of range; use 0..50, e.g. {d.guidance_low_noise}")
    if request.guidance_low_noise is not None and d.boundary is None:
        raise UsageError(f"{arg('guidance_low_noise')} is for two-expert models (Wan2.2 A14B); {spec.name} has "
                         f"one denoiser: use {arg('guidance')}")
    scheduler = request.scheduler or ("euler" if timesteps else d.scheduler)
    if scheduler not in SOLVERS:
        raise UsageError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SOLVERS)}")
    if timesteps is not None:
        _check_timesteps(timesteps, steps, scheduler, d.num_train_timesteps)
    g = request.guidance
    # Official A14B defaults differ per expert (wan/configs/wan_t2v_A14B.py sample_guide_scale = (3.0, 4.0):
    # low-noise, high-noise). One --guidance sets both, as before; --guidance-low-noise then overrides the second.
    g_low = request.guidance_low_noise if request.guidance_low_noise is not None else g
    g_high_final = d.guidance_high_noise if g is None else g
    g_low_final = d.guidance_low_noise if g_low is None else g_low
    cache = parse_cache(request.cache)
    if cache.method != "none" and abs(g_high_final - 1.0) <= 1e-6 and abs(g_low_final - 1.0) <= 1e-6:
        # LightX2V refuses feature caching for step/CFG-distilled runs (fast_paths.md B.1, C.6)
        why = f"the {request.recipe} recipe is distilled" if request.recipe else f"{arg('guidance', 1)} turns CFG off"
        raise UsageError(f"{arg('cache', cache)} is for guided, undistilled runs and {why} (caching is refused "
                         f"there, as LightX2V does); leave {arg('cache')} out")
    return Settings(
        prompt=prompt,
        negative_prompt=clean_prompt(d.negative_prompt if request.negative_prompt is None else request.negative_prompt),
        width=width, height=height, num_frames=frames, steps=steps,
        guidance_high_noise=g_high_final, guidance_low_noise=g_low_final,
        shift=shift, seed=request.seed, scheduler=scheduler,
        timesteps=tuple(float(t) for t in timesteps) if timesteps is not None else None,
        recipe=request.recipe, loras=tuple(loras) + request.loras, image=image, last_image=last_image, cache=str(cache),
        image_sha256=image_sha256, last_image_sha256=last_image_sha256,
    )


def missing_recipe_lora(recipe_name: str | None, spec: ModelSpec, loras: Sequence[LoraRef],
                        job: bool = False, baked: Sequence[BakedLora] = ()) -> str | None:
    """A message when the recipe has a LoRA slot the user must fill (`LoRA yours` in `vidrt info`: a
    distillation recipe) and neither `loras` (everything the run merges) nor `baked` (the package's
    manifest `baked_loras`: what `vidrt export --lora` merged into its DiT) holds a LoRA for it.
    job: worded for a job's fields (a `vidrt batch` line, a `vidrt serve` request: "recipe", "loras")
    instead of `vidrt run`'s flags."""
    if recipe_name is None:
        return None
    recipe = all_recipes(spec.recipes).get(recipe_name)
    if recipe is None:
        return None
    shipped = {s.file for s in recipe.loras if s.file is not None}
    mine = [r.expert for r in loras if r.path not in shipped] + [b.expert for b in baked]
    for slot in recipe.loras:
        if slot.file is None and not any(slot.expert is None or e in (None, slot.expert) for e in mine):
            # the `vidrt run` flags a source names ("high_noise (--lora-high-noise)"): for the CLI only
            source = slot.source if flags_shown() and not job else re.sub(r" \(--[a-z-]+\)", "", slot.source)
            if job:
                example = f'"{slot.expert}=FILE.safetensors"' if slot.expert else '"FILE.safetensors"'
                both = ' (one file for both experts, or "dit_high=FILE" and "dit_low=FILE")' \
                    if slot.expert is None and len(spec.experts) > 1 else ""
                return (f"recipe {recipe.name} is made for a distillation LoRA ({source}) and none was given; "
                        f"without it its few steps make noise: add it to loras, e.g. \"loras\": [{example}]{both}")
            if slot.expert is not None:
                flags = arg(f"lora_{'high' if slot.expert == 'dit_high' else 'low'}_noise", "FILE")
            elif len(spec.experts) > 1:
                flags = (f"{arg('lora_high_noise', 'FILE')} and {arg('lora_low_noise', 'FILE')} "
                         f"(or {arg('lora', 'FILE')} for both)")
            else:
                flags = arg("lora", "FILE")
            return (f"{arg('recipe', recipe.name)} is made for a distillation LoRA ({source}) and none was given; "
                    f"without it its few steps make noise: pass {flags}")
    return None


def _apply_recipe(request: Request, recipe: Recipe, spec: ModelSpec) -> Request:
    """The request with the recipe's fields where the request has None. The recipe's explicit timestep
    list belongs to its sampler and its step count: a --steps different from the list's length or a
    --sampler other than the recipe's drops the list (then --steps or the recipe's step count, spaced by
    the sampler's own rule)."""
    timesteps = request.timesteps
    if (timesteps is None and recipe.timesteps is not None and request.steps in (None, len(recipe.timesteps))
            and request.scheduler in (None, recipe.scheduler)):
        timesteps = recipe.timesteps
    recipe_steps = recipe.steps if recipe.steps is not None else \
        (len(recipe.timesteps) if recipe.timesteps is not None else None)
    shipped = tuple(LoraRef(s.file, s.strength, s.expert) for s in recipe.loras if s.file is not None)
    g_low = request.guidance_low_noise
    if g_low is None and request.guidance is None and spec.sampling.boundary is not None:
        g_low = recipe.guidance_low_noise
    return Request(
        prompt=request.prompt, negative_prompt=request.negative_prompt, width=request.width,
        height=request.height, num_frames=request.num_frames,
        steps=request.steps if request.steps is not None else (None if timesteps else recipe_steps),
        guidance=_pick(request.guidance, recipe.guidance, None),  # type: ignore[arg-type]
        guidance_low_noise=g_low, shift=_pick(request.shift, recipe.shift, None),  # type: ignore[arg-type]
        seed=request.seed, scheduler=_pick(request.scheduler, recipe.scheduler, None),  # type: ignore[arg-type]
        timesteps=timesteps, recipe=request.recipe, loras=shipped + request.loras, image=request.image,
        last_image=request.last_image, cache=request.cache)


def _check_timesteps(timesteps: tuple[float, ...], steps: int, scheduler: str, n_train: int) -> None:
    if scheduler != "euler":
        raise UsageError(f"{arg('timesteps')} is for {arg('scheduler', 'euler')}, not {scheduler}; "
                         f"add {arg('scheduler', 'euler')}")
    if len(timesteps) != steps:
        raise UsageError(f"{arg('timesteps')} has {len(timesteps)} values but {arg('steps')} is {steps}; give "
                         f"one timestep per step or leave {arg('steps')} out")
    ok = all(math.isfinite(t) and 0 < t <= n_train for t in timesteps) and \
        all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))
    if not ok:
        raise UsageError(f"{arg('timesteps')} {','.join(f'{t:g}' for t in timesteps)} must decrease strictly within "
                         f"(0, {n_train}], e.g. 1000,750,500,250")


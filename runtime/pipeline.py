"""prompt -> frames, on any backend. The loop reads like the algorithm (DESIGN.md §3-§5).

    pipe = Pipeline.load("engines/wan2.1-t2v-1.3b")        # or Pipeline.load(): the bundled model
    result = pipe("a cat surfing a wave at sunset", num_frames=81, seed=7)
    result.save("cat.mp4")                                  # frames: uint8 [F, H, W, 3]

    0. memory   on a GPU backend, the residency plan (`vidrt plan`'s code) for this clip: CFG batch,
                VAE tile, which engines are released after their stage; refused if it cannot fit.
                On ONNX Runtime (CPU), the host memory of one DiT call: CFG batch 2 or 1, or refused
    1. plan     every step's timestep, sigma, expert, guidance and whether it needs CFG, built up front
    2. text     umT5 embeddings of the prompt (and the negative prompt when a step needs CFG),
                zero-padded to 512 rows
    2b. image   image-to-video: the image preprocessed by the model's rule, VAE-encoded once (streaming
                encoder graphs, released before denoising) into a conditioning policy (vidrt.conditioning)
    3. noise    seeded normal latents [C, F, H, W] (or the caller's array)
    4. denoise  per step: one batch-2 DiT call (cond, uncond) and CFG, or one batch-1 call where the
                step's guidance is 1 (CFG-free), then the solver update (+ the conditioning's DiT
                input, per-token timesteps and re-imposed first frame);
                the `--cache` policy (vidrt.caching) may reuse the block stack's residual instead
    5. decode   tiled, streamed VAE decode; frames go to the consumer as each latent frame is done
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from vidrt.backends import open_backend
from vidrt.backends.base import Backend, BackendOptions, Engine
from vidrt.backends.residency import ResidencyPlan, ort_dit_host_bytes, plan_for_package
from vidrt.caching import (
    PIECES_NEEDED,
    CachePolicy,
    ExpertDiT,
    build_policy,
    check_cache,
    mask_string,
    parse_cache,
    static_mask,
)
from vidrt.conditioning import Concat, FirstFrame, TextOnly, frame_mask
from vidrt.embedding_cache import EmbeddingCache, package_key
from vidrt.errors import DeviceError, PackageError, UsageError, arg, command_or, commands_shown
from vidrt.lora import LoraMerger, SetKey, as_lora_refs, superseded
from vidrt.package import contracts as C
from vidrt.package.manifest import Manifest, artifact_path, load_manifest
from vidrt.package.recipes import LoraRef
from vidrt.request import Request, Settings, missing_recipe_lora, resolve
from vidrt.schedulers import Step, expert_for_timestep, make_schedule, make_solver
from vidrt.stats import RunStats
from vidrt.text import PromptTokenizer, check_prompt, encode_prompts
from vidrt.vae_decode import (
    ORT_ACTIVATION_SLOTS,
    TilePlan,
    auto_budget_bytes,
    available_memory_bytes,
    choose_tile,
    iter_decode,
)
from vidrt.video import VideoWriter, clip_metadata, to_uint8

# (stage, done, total): "denoise" counts steps, "decode" counts video frames.
ProgressFn = Callable[[str, int, int], None]
FramesFn = Callable[[np.ndarray], None]  # uint8 [n, H, W, 3] as soon as they are decoded


# Wan2.2-Lightning's rule (wan/utils/utils.py `use_cfg`): CFG only where |scale - 1| > 1e-6.
CFG_FREE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    expert: str  # DiT graph name: "dit", "dit_high" or "dit_low"
    guidance: float

    @property
    def cfg(self) -> bool:
        """Does this step need the unconditional pass? u + 1 * (c - u) = c, so guidance 1 does not."""
        return abs(self.guidance - 1.0) > CFG_FREE_TOLERANCE


@dataclass
class Result:
    """One generated clip.

    frames    uint8 [num_frames, height, width, 3] (RGB), or None when `on_frames` consumed them as a stream
    settings  the request with every default filled in (the seed, size, steps, guidance... actually used)
    stats     per-stage seconds (`stats.table()`, `stats.to_dict()`)
    fps       the model's frame rate (frames per second); `save` writes at this rate unless told otherwise
    model     the model's name (manifest), written into the file's metadata
    Every LoRA the clip was made with (baked into the package, the pipeline's, the recipe's, the request's)
    is in settings.loras, named in the file's metadata.
    """

    frames: np.ndarray | None
    settings: Settings
    stats: RunStats
    fps: int = 16
    model: str = ""

    def save(self, path: str | Path, *, fps: int | None = None, crf: int | None = None,
             overwrite: bool = False) -> Path:
        """Write the clip: `.mp4` (H.264), `.webm` (VP9), or a folder of PNG frames (a path without a
        suffix), with the settings as metadata. Written to a temporary file and renamed when complete.
        Raises OutputError if `path` exists and `overwrite` is false or the format is unknown, UsageError
        if the frames were streamed to `on_frames` instead of kept. Returns the absolute path."""
        if self.frames is None:
            raise UsageError("this result holds no frames: they were streamed to on_frames; "
                             "run without on_frames to keep them")
        metadata = clip_metadata(self.settings, self.model)
        with VideoWriter(path, fps=fps or self.fps, crf=crf, metadata=metadata, overwrite=overwrite) as writer:
            writer.write(self.frames)
        return writer.path


def plan_steps(manifest: Manifest, s: Settings) -> list[PlannedStep]:
    """Stage 1. Two-expert models use the high-noise expert while t >= boundary * 1000."""
    spec = manifest.model
    out = []
    for step in make_schedule(s.scheduler, s.steps, s.shift, spec.sampling.num_train_timesteps, s.timesteps):
        if spec.sampling.boundary is None:
            expert, g = spec.experts[0], s.guidance_low_noise
        elif expert_for_timestep(step.timestep, spec.sampling.boundary,
                                 spec.sampling.num_train_timesteps) == "high":
            expert, g = "dit_high", s.guidance_high_noise
        else:
            expert, g = "dit_low", s.guidance_low_noise
        out.append(PlannedStep(step, expert, g))
    return out


def _check_finite(stage: str, x: np.ndarray, precision: str, reduced_hint: str,
                  fp32_hint: str | None = None) -> None:
    """NaN/Inf out of a stage stops the run, naming the stage and its likely cause."""
    if not np.isfinite(x).all():
        corrupt = "its weights may be corrupt; re-export the package" + command_or(" (`vidrt export`)", "")
        cause = reduced_hint if precision in ("fp16", "bf16", "fp8") else fp32_hint or corrupt
        raise DeviceError(f"the {stage} produced NaN/Inf ({precision}); {cause}")


def decode_plan(manifest: Manifest, s: Settings, vae_memory_bytes: int | None) -> TilePlan:
    """The VAE tile plan for these settings; a budget too small fails here, before any inference."""
    _, _, lat_h, lat_w = manifest.model.latent_shape(s.width, s.height, s.num_frames)
    # no memory plan: ONNX Runtime's activation figure; without --vae-memory the fix is a smaller frame
    auto = {} if vae_memory_bytes else {"budget_name": "the automatic VAE memory budget (half the available RAM)",
                                        "fix": f"lower {arg('size')}"}
    return choose_tile(manifest.components[C.VAE_STEP].contract, lat_h, lat_w,
                       vae_memory_bytes or auto_budget_bytes(), scale=manifest.model.vae.stride[1],
                       activation_slots=ORT_ACTIVATION_SLOTS, **auto)


class Pipeline:
    """A loaded model package: sessions created once, reused for every run."""

    def __init__(self, package: Path, manifest: Manifest, options: BackendOptions,
                 warn: Callable[[str], None] | None = None) -> None:
        self.package = package
        self.manifest = manifest
        self.options = options
        self.warn = warn or (lambda msg: print(f"warning: {msg}"))
        self.backend = open_backend(options, manifest, package)
        self.tokenizer = PromptTokenizer(artifact_path(package, manifest.tokenizer.file),
                                         manifest.model.text.text_len)
        self._engines: dict[str, Engine] = {}
        self.text_backend: Backend | None = None  # umT5 on ONNX Runtime CPU when the memory plan says so
        self.embeddings: EmbeddingCache | None = None  # prompt embeddings on disk (Pipeline.load)
        self.load_seconds = 0.0
        self.cfg_batch: int | None = None  # None: the memory plan's (2 where there is none); 1: two DiT calls
        # LoRAs (vidrt.lora): applied to every run (Pipeline.load(loras=...)); a run adds its recipe's and
        # request's. ONNX Runtime: DiT sessions are kept per (expert, LoRA set), made with the merged
        # initializers and parked, not closed, when another set is wanted. TensorRT: one engine per graph,
        # refitted in place when the set changes (vidrt.backends.refit).
        self.loras: tuple[LoraRef, ...] = ()
        self._merger = LoraMerger(package, manifest, self.warn)
        self._want: dict[str, tuple[LoraRef, ...]] = {}  # expert -> the LoRAs of the current run
        self._engine_key: dict[str, SetKey] = {}
        self._parked: dict[tuple[str, SetKey], Engine] = {}
        self._merge_stats = [0.0, 0]  # seconds, bytes of the merges since the last run began

    @classmethod
    def load(cls, package: str | Path | None = None, backend: str = "auto", device: str = "cpu",
             threads: int | None = None, verify: bool = True,
             warn: Callable[[str], None] | None = None, embedding_cache: str | Path | None = None,
             loras: Sequence[LoraRef | tuple[str, float] | str] | None = None) -> Pipeline:
        """Open a model package folder (what `vidrt export` writes; None = the bundled tiny model).

        backend  "auto" (TensorRT when a GPU, TensorRT and matching plans are present, else ONNX Runtime),
                 "onnxruntime" (CPU), "onnxruntime-cuda" (ONNX Runtime's CUDA provider) or "tensorrt";
                 threads: ONNX Runtime CPU threads (None = all cores);
                 verify: check the artifacts' sha256 (remembered per file, vidrt.package.verified);
                 warn: where warnings go (default: print);
                 loras: [(path, strength), ...] or LoraRef(path, strength, expert) (A14B: expert "dit_high"
                 or "dit_low"), safetensors in any key format of fast_paths.md A.2, merged into the DiT at
                 load time (no re-export) for every run; each file is read and checked here.
        Raises PackageError (missing/damaged package, wrong schema or hashes), UsageError (unknown backend),
        DeviceError (TensorRT asked for but not usable here). Engines open on first use.
        """
        t0 = time.perf_counter()
        if package is None:
            from vidrt.models import default_package

            package = default_package()
            if package is None:
                raise UsageError("this build ships no bundled model; pass a package folder to Pipeline.load")
        package = Path(package)
        manifest = load_manifest(package, verify=verify)
        pipe = cls(package, manifest, BackendOptions(backend=backend, device=device, threads=threads), warn)
        if embedding_cache is not None:  # a repeated prompt then skips the text encoder
            pipe.embeddings = EmbeddingCache(embedding_cache, package_key(manifest))
        pipe.loras = pipe.applied_loras(as_lora_refs(loras))  # a file given twice refused, a baked one dropped
        for expert in manifest.model.experts:  # refuse a bad file or key set now, not mid-run
            pipe._merger.check(expert, pipe.loras)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    def applied_loras(self, loras: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
        """The LoRAs a run with `loras` (the pipeline's, the recipe's, the request's) merges: a file baked
        into the package is not merged again, the recipe's own file given again by the user is merged once
        at the user's strength (each with a one-line warning), any other file given twice is refused
        (UsageError); the package's baked LoRAs come first, as records (LoraRef.baked, never merged).
        What Result.settings.loras, --stats-json and the file's metadata list."""
        return self._merger.applied(loras)

    def engine(self, name: str) -> Engine:
        """Open a component once, on first use; a DiT (or one of its step-caching pieces, whose LoRA set
        is its expert's) with the current run's LoRA set merged in."""
        want = self._merger.key(name, self._want.get(self._merger.expert_of(name), ()))
        current = self._engines.get(name)
        if current is not None and self._engine_key.get(name, ()) == want:
            return current
        backend = self.text_backend if name == C.TEXT_ENCODER and self.text_backend else self.backend
        refit = getattr(backend, "refit", None)
        if current is not None and refit is not None:
            # TensorRT: one engine per graph, its weights refitted in place from the base weights
            # (vidrt.backends.refit); an empty set restores the base. ONNX Runtime: a session per set.
            refit(current, self._merged(name) if want else {})
            self._engine_key[name] = want
            return current
        if current is not None:
            self._parked[(name, self._engine_key.get(name, ()))] = self._engines.pop(name)
        for key in [k for k in self._parked if k[0] == name and superseded(k[1], want)]:
            self._parked.pop(key).close()  # made from a file since rewritten: never wanted again
        engine = self._parked.pop((name, want), None)
        if engine is None:
            comp = self.manifest.components[name]
            path = artifact_path(self.package, comp.artifact_for(backend.cpu_features).file)
            merged = self._merged(name) if want else {}
            engine = backend.open(name, path, comp.contract, weights=merged) if merged \
                else backend.open(name, path, comp.contract)
        self._engines[name], self._engine_key[name] = engine, want
        return engine

    def _merged(self, name: str) -> dict[str, np.ndarray]:
        _, merged = self._merger.merged(name, self._want.get(self._merger.expert_of(name), ()))
        self._merge_stats[0] += self._merger.last_seconds
        self._merge_stats[1] = max(self._merge_stats[1], self._merger.last_bytes)
        return merged

    def release(self, name: str) -> None:
        engine = self._engines.pop(name, None)
        self._engine_key.pop(name, None)
        for key in [k for k in self._parked if k[0] == name or k[0].startswith(name + ".")]:  # + its pieces
            self._parked.pop(key).close()
        if engine is not None:
            engine.close()
        for key in [k for k in self._engines if k.startswith(name + ".")]:  # its step-caching pieces
            self._engine_key.pop(key, None)
            self._engines.pop(key).close()

    # ---- the run -------------------------------------------------------------------------------

    def __call__(self, prompt: str, *, negative_prompt: str | None = None,
                 size: str | tuple[int, int] | None = None, width: int | None = None, height: int | None = None,
                 num_frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                 guidance_low_noise: float | None = None, shift: float | None = None, seed: int | None = None,
                 scheduler: str | None = None, timesteps: tuple[float, ...] | None = None,
                 recipe: str | None = None, noise: np.ndarray | None = None,
                 on_frames: FramesFn | None = None, progress: ProgressFn | None = None,
                 vae_memory: str | int | None = None, image: str | Path | np.ndarray | None = None,
                 last_image: str | Path | np.ndarray | None = None, cache: str | None = None) -> Result:
        """Generate one clip; keyword names follow `vidrt run`'s flags. None = the model's default.

        size        "WxH" (e.g. "832x480") or (width, height), pixels; or width= and height=
        num_frames  video frames, 4k+1 (Wan: 81 at 16 fps; TI2V-5B: 121 at 24 fps)
        steps, shift, scheduler ("unipc" | "dpm++" | "euler")
        seed        0..2**63-1; None or -1: a random one (Result.settings.seed says which)
        timesteps   euler: the unshifted timestep list, e.g. (1000, 750, 500, 250)
        recipe      a named recipe ("lightx2v-4step", the package's "fast", ...; `vidrt info` lists them);
                    the other keywords override its fields
        guidance    CFG scale; guidance_low_noise: the low-noise expert's scale on two-expert models (A14B)
        noise       float32 [C, F_lat, H/8, W/8] (Wan2.2 TI2V: H/16, W/16) initial latents instead of the seed's
        on_frames   called with uint8 [n, H, W, 3] chunks as they are decoded (then Result.frames is None)
        progress    called with (stage, done, total): "denoise" counts steps, "decode" counts frames
        vae_memory  memory budget for one VAE tile, bytes or "2GB" (default: chosen automatically)
        image       image-to-video models: the first frame, a path or uint8 [H, W, 3] RGB; without a size
                    the clip's size follows the image (vidrt.image.output_size); last_image: FLF2V only
        cache       step caching "METHOD[:THRESHOLD]": teacache, magcache, easycache, fbcache (vidrt.caching)
        Returns a Result (frames uint8 [F, H, W, 3], settings, stats). Raises UsageError for values the
        model cannot run (naming the nearest valid ones), DeviceError for failures while running.
        """
        from vidrt.vae_decode import parse_bytes

        # The keywords that are not Request fields are checked here; Request checks its own (FIELD_TYPES).
        if size is not None:
            if width is not None or height is not None:
                raise UsageError("give size or width and height, not both")
            if isinstance(size, str):
                parts = size.lower().replace("*", "x").split("x")
                if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                    raise UsageError(f"size {size!r} is not WIDTHxHEIGHT; write it like 832x480")
                width, height = int(parts[0]), int(parts[1])
            elif isinstance(size, tuple | list) and len(size) == 2:
                width, height = size
            else:
                raise UsageError(f"size must be \"WIDTHxHEIGHT\" or (width, height), got {size!r}"[:200])
        if vae_memory is not None and (isinstance(vae_memory, bool) or not isinstance(vae_memory, str | int)):
            raise UsageError(f"vae_memory must be bytes (an integer) or a string like \"2GB\", got {vae_memory!r}")
        if noise is not None and not isinstance(noise, np.ndarray):
            raise UsageError(f"noise must be a numpy array [C, F, H, W], got {type(noise).__name__}")
        budget = parse_bytes(vae_memory) if isinstance(vae_memory, str) else vae_memory
        request = Request(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                          num_frames=num_frames, steps=steps, guidance=guidance,
                          guidance_low_noise=guidance_low_noise, shift=shift, seed=seed, scheduler=scheduler,
                          timesteps=tuple(timesteps) if timesteps is not None else None, recipe=recipe,
                          image=image, last_image=last_image, cache=cache)
        return self.run(request, noise=noise, on_frames=on_frames, progress=progress, vae_memory_bytes=budget)

    def run(self, request: Request, noise: np.ndarray | None = None, on_frames: FramesFn | None = None,
            progress: ProgressFn | None = None, vae_memory_bytes: int | None = None,
            keep_text_encoder: bool = True, policy: CachePolicy | None = None) -> Result:
        """Generate one clip for `request` (see __call__). `policy`: a step-cache policy object that
        replaces the one `request.cache` names (`vidrt cache calibrate` passes a recording one)."""
        spec = self.manifest.model
        check_prompt(request.prompt)
        s = resolve(request, spec, loras=self.loras)  # s.loras: the pipeline's, the recipe's, the request's
        s = replace(s, loras=self.applied_loras(s.loras))  # ... each file merged once, none baked in twice
        stats = RunStats(backend=self.backend.name)
        stats.seconds["load"] = self.load_seconds
        report = progress or (lambda stage, done, total: None)
        latent_shape = spec.latent_shape(s.width, s.height, s.num_frames)  # [C, F, h, w]
        if noise is not None:  # the caller's latents, checked before any work (not as a NaN out of the DiT)
            if tuple(noise.shape) != latent_shape:
                raise UsageError(f"noise has shape {tuple(noise.shape)}, this request needs {latent_shape}")
            if not np.isfinite(noise).all():
                raise UsageError("noise holds NaN or Inf values; pass finite float32 latents (standard normal), "
                                 "or leave noise out for the seed's")
        stats.num_tokens = spec.num_tokens(s.width, s.height, s.num_frames)
        precision = {name: comp.precision for name, comp in self.manifest.components.items()}

        # 0. memory
        memory = self.memory_plan(s)
        cfg_batch = self.cfg_batch or (memory.cfg_batch if memory else self.host_cfg_batch(s))
        # On a planned backend (TensorRT) the tile is the plan's: the one the VAE engines were built for.
        tiles = memory.vae_tile if memory else decode_plan(self.manifest, s, vae_memory_bytes)
        if memory and vae_memory_bytes is not None:
            self.warn(f"{arg('vae_memory')} does not apply on TensorRT: the VAE tile is the one its engines were built "
                      "for (vidrt build --vae-tile)")
        released = {name for stage in memory.stages for name in stage.release} if memory else set()
        if memory:
            self.backend.stream_weights(memory.streamed)
        gpu_stats = getattr(self.backend, "gpu_stats", None)  # TensorRT: CUDA-event times, peak memory
        if gpu_stats is not None:
            self.backend.reset_gpu_stats()  # type: ignore[attr-defined]
        keep_text_encoder = keep_text_encoder and C.TEXT_ENCODER not in released
        if memory and memory.text_device == "cpu" and self.text_backend is None:
            # a card too small for umT5 (the official code's --t5_cpu): it runs on ONNX Runtime CPU
            if precision[C.TEXT_ENCODER] == "bf16":
                fix = command_or("export the package with --precision fp8 or fp16 (their text encoder is fp32), "
                                 "or see `vidrt plan` for what fits", "the server's operator can export its package "
                                 "in fp8 or fp16 (their text encoder is fp32)")
                raise DeviceError("umT5 does not fit this GPU next to the rest and must run on the CPU, where "
                                  f"ONNX Runtime has no bfloat16 kernels; {fix}")
            self.release(C.TEXT_ENCODER)
            self.text_backend = open_backend(BackendOptions(backend="onnxruntime", threads=self.options.threads),
                                             self.manifest)

        # 1. plan
        plan = plan_steps(self.manifest, s)
        solver = make_solver(s.scheduler, [p.step for p in plan])
        needs_uncond = any(p.cfg for p in plan)
        loras = s.loras  # the pipeline's, then the recipe's and the request's
        missing = missing_recipe_lora(s.recipe, spec, loras, baked=self.manifest.baked_loras)
        if missing is not None:  # the CLI refuses this; the API runs it (the recipe as a schedule) and warns
            self.warn(missing)
        self._want = {expert: loras for expert in spec.experts}
        self._merge_stats = [0.0, 0]
        check_refit = getattr(self.backend, "check_refit", None)  # TensorRT: refittable plans, or one line now
        pieces = C.DIT_PIECES if parse_cache(s.cache).method in PIECES_NEEDED else ()
        for expert in spec.experts:
            if check_refit is not None and self._merger.key(expert, loras):
                for name in (expert, *(C.dit_piece(expert, p) for p in pieces)):
                    check_refit(name)

        # 2. text: [2, 512, d_model], row 0 = prompt, row 1 = negative prompt; [1, ...] when no step needs CFG
        with stats.stage("text"):
            self._warn_unknown_words(s.prompt)
            if not needs_uncond and request.negative_prompt:  # asked for, but no step runs the uncond pass
                self.warn("the negative prompt has no effect: no step uses classifier-free guidance (guidance 1)")
            prompts = [s.prompt, s.negative_prompt] if needs_uncond else [s.prompt]
            context = self.embeddings.get(prompts) if self.embeddings else None
            if context is None:
                context = encode_prompts(self.engine(C.TEXT_ENCODER), self.tokenizer, prompts, self.warn, clean=False)
                _check_finite("text encoder", context, precision[C.TEXT_ENCODER],
                              "umT5 overflows in reduced precision: re-export it in fp32")
                if self.embeddings:
                    self.embeddings.put(prompts, context)
            if not keep_text_encoder:
                self.release(C.TEXT_ENCODER)  # its memory is not needed again for this clip

        # 2b. image: encoded once; the encoder's memory is not needed again for this clip
        with stats.stage("image") if request.image is not None else contextlib.nullcontext():
            cond = self.conditioning(request, s)

        # Step caching (vidrt.caching): the DiT per expert under the cache policy; TeaCache/MagCache decide
        # every step here, before the run. No cache keeps the whole-graph call below (_velocity).
        if policy is None and s.cache != "none":
            policy = self._cache_policy(s, plan, cond, latent_shape, context, cfg_batch)
        dits: dict[str, ExpertDiT] = {}
        t_rows: list[np.ndarray] = []
        if policy is not None:
            shape_only = np.zeros(latent_shape, np.float32)
            t_rows = [cond.timestep_row(p.step.timestep, shape_only) for p in plan]
            dits = self._expert_dits(plan, context, cfg_batch)  # (TeaCache's mask ran on its own copies)
            stats.cache = policy.stats

        # 3. noise
        if noise is None:
            latents = np.random.default_rng(s.seed).standard_normal(latent_shape, dtype=np.float32)
        else:
            latents = np.asarray(noise, dtype=np.float32).copy()
        latents = cond.initial(latents)

        # 4. denoise
        last_step = {p.expert: i for i, p in enumerate(plan)}
        with stats.stage("denoise"):
            for i, p in enumerate(plan):
                t0 = time.perf_counter()
                if policy is None:
                    velocity = self._velocity(p, latents, context, cfg_batch, stats, cond)
                    stats.cache.block_stack_runs += 1  # no cache: the whole graph, blocks included
                else:
                    if i > 0 and plan[i - 1].expert != p.expert:
                        policy.new_expert()  # A14B: no residual crosses the expert switch
                    rows = policy.step(i, dits[p.expert], latents, t_rows[i])  # [cond(, uncond), C, F, H, W]
                    stats.dit_calls += len(rows)  # DiT evaluations: a batch-2 CFG call is two
                    velocity = rows[1] + np.float32(p.guidance) * (rows[0] - rows[1]) if p.cfg else rows[0]
                if i == last_step[p.expert] and p.expert in released:
                    self.release(p.expert)  # A14B: the high-noise expert goes at the boundary
                    dits.pop(p.expert, None)  # with its step-invariant embeddings (device memory on TensorRT)
                merged_in = self._merger.for_expert(p.expert, loras)
                blame = ("the LoRA(s) merged into it are the likely cause: " + ", ".join(
                    f"{r.named} (strength {r.strength:g})" for r in merged_in) +
                    "; lower the strength or use another file" if merged_in else "")
                _check_finite(f"denoiser ({p.expert}, step {i + 1}/{len(plan)})", velocity, precision[p.expert],
                              blame or "the DiT overflows in fp16: use bf16 or fp32 engines",
                              blame or f"{arg('guidance')}/{arg('shift')} may be extreme or the weights corrupt; "
                                       "lower them or re-export")
                latents = cond.after_step(solver.step(velocity, latents))
                stats.denoise_step_seconds.append(time.perf_counter() - t0)
                report("denoise", i + 1, len(plan))

        if policy is not None:
            policy.new_expert()  # the last window ends: its residuals go before decoding (device memory)
        dits.clear()
        stats.lora_merge_seconds, stats.lora_merge_bytes = self._merge_stats[0], int(self._merge_stats[1])

        # 5. decode (+ write, timed apart inside the consumer)
        frames: list[np.ndarray] = []
        done = 0

        def consume(chunk: np.ndarray) -> None:
            nonlocal done
            _check_finite("VAE decoder", chunk, precision[C.VAE_STEP], "the VAE must run in fp32: re-export it")
            uint8 = to_uint8(chunk)
            t0 = time.perf_counter()
            if on_frames is None:
                frames.append(uint8)
            else:
                on_frames(uint8)
            stats.seconds["write"] += time.perf_counter() - t0
            done += len(uint8)
            report("decode", done, s.num_frames)

        stats.vae_tiles = tiles.count
        t_decode = time.perf_counter()
        # The step engine opens after frame 0; the first-frame engine is released first where the
        # memory plan says so (TensorRT), so the two are never on the device together.
        release_first = (lambda: self.release(C.VAE_FIRST)) if C.VAE_FIRST in released else None
        order = memory.decode_order if memory else "frame"  # the plan's: tile-major keeps one tile's caches
        for chunk in iter_decode(latents, self.engine(C.VAE_FIRST), lambda: self.engine(C.VAE_STEP), tiles,
                                 mean=spec.vae.latents_mean, std=spec.vae.latents_std, release_first=release_first,
                                 order=order):
            consume(chunk)
        stats.seconds["decode"] = time.perf_counter() - t_decode - stats.seconds["write"]
        video = np.concatenate(frames) if frames else None
        if gpu_stats is not None:
            stats.gpu = {**gpu_stats(), **({"planned_peak_bytes": memory.peak} if memory else {})}
        return Result(frames=video, settings=s, stats=stats, fps=spec.sampling.fps, model=spec.name)

    def cache_mask(self, request: Request) -> str:
        """The TeaCache / MagCache plan of a run, before it: "C" = the block stack runs, "s" = its cached
        residual is reused (fast_paths.md C.2 notation). Needs no prompt encoding (the decisions depend
        on the timesteps only). Raises UsageError for other methods or a package without tables."""
        s = resolve(request, self.manifest.model)
        choice = check_cache(self.manifest, s.cache)
        if choice.method not in ("teacache", "magcache"):
            raise UsageError(f"{arg('cache', choice)}: only teacache and magcache decide before the run; "
                             f"fbcache and easycache decide per step")
        plan = plan_steps(self.manifest, s)
        spec = self.manifest.model
        shape = spec.latent_shape(s.width, s.height, s.num_frames)
        rows = np.zeros((2, spec.text.text_len, spec.dit.text_dim), np.float32)  # not read by time_embed
        dits = {e: ExpertDiT(self.engine, e, rows, 2, self.backend.tensor_ops()) for e in spec.experts}
        mask = static_mask(choice, self.manifest, [p.expert for p in plan],
                           [self._timestep_row(p, shape) for p in plan], dits.__getitem__, shape)
        return mask_string(mask)

    def memory_plan(self, s: Settings) -> ResidencyPlan | None:
        """The device-memory plan for these settings on a backend whose memory vidrt plans (None on
        ONNX Runtime); a clip that cannot fit is refused here, before any engine runs."""
        device = self.backend.device_memory()
        if device is None:
            return None
        budget, precision = device
        # TensorRT: the VAE tile is fixed by its engines' profile; the plan checks that it fits.
        plan = plan_for_package(self.package, self.manifest, s.width, s.height, s.num_frames, budget, precision,
                                vae_tile=getattr(self.backend, "vae_tile", None), image=s.image is not None,
                                cache=s.cache)
        if not plan.fits:  # the `vidrt plan` pointer only where the caller has that shell (not a job's client)
            see = f" (see `vidrt plan {self.package} --size {s.width}x{s.height} --frames {s.num_frames}`)" \
                if commands_shown() else ""
            raise DeviceError(f"{s.width}x{s.height}x{s.num_frames} needs {plan.peak / 2**30:.1f} GiB of GPU memory "
                              f"and {budget / 2**30:.1f} GiB are free; lower {arg('size')} or {arg('num_frames')}{see}")
        return plan

    def host_cfg_batch(self, s: Settings) -> int:
        """ONNX Runtime on the CPU: the CFG batch whose DiT call fits the available host memory (2, else two
        batch-1 calls); a clip whose batch-1 call cannot fit is refused here, before anything runs (the
        exported attention materialises heads x tokens² scores: residency.ort_dit_host_bytes). Other
        backends without a memory plan (onnxruntime-cuda): 2."""
        if self.backend.name != "onnxruntime":
            return 2
        available = available_memory_bytes()
        need = {b: ort_dit_host_bytes(self.manifest.model, s.width, s.height, s.num_frames, b) for b in (2, 1)}
        for batch in (2, 1):
            if need[batch] <= available:
                return batch
        tokens = self.manifest.model.num_tokens(s.width, s.height, s.num_frames)
        raise DeviceError(f"{s.width}x{s.height}x{s.num_frames} needs about {need[1] / 2**30:.1f} GiB of host memory "
                          f"on ONNX Runtime (the DiT's attention over {tokens} tokens) and {available / 2**30:.1f} GiB "
                          f"are available; lower {arg('size')} or {arg('num_frames')}, or run on a GPU "
                          f"({arg('backend', 'tensorrt')})")

    def conditioning(self, request: Request, s: Settings) -> TextOnly:
        """Stage 2b: the conditioning policy of this request (vidrt.conditioning). With an image: load and
        preprocess it by the model's rule at the resolved size, VAE-encode it with the streaming encoder
        (TI2V: the first chunk only; concat models: [image, grey...] over the whole clip), then release
        the encoder graphs."""
        spec = self.manifest.model
        plain = TextOnly(spec.per_token_timestep, spec.dit.patch_size)
        if request.image is None or spec.image is None:
            return plain
        from vidrt.image import load_image, preprocess
        from vidrt.vae_encode import encode

        if C.VAE_ENCODE_FIRST not in self.manifest.components:
            raise PackageError(command_or(f"{self.package} has no VAE encoder graphs (exported before vidrt took "
                                          f"images); re-export it with `vidrt export` to use {arg('image')}",
                                          "this server's model package has no VAE encoder graphs (exported before "
                                          f"vidrt took images), so it cannot take {arg('image')}"))
        rule = spec.image.resize
        first_px = preprocess(load_image(request.image), s.width, s.height, rule)  # [3, H, W] in [-1, 1]
        first, step = self.engine(C.VAE_ENCODE_FIRST), self.engine(C.VAE_ENCODE_STEP)
        norm = dict(mean=spec.vae.latents_mean, std=spec.vae.latents_std)
        try:
            if spec.image.mode == "first_frame":  # causal: frame 0's latent is the first chunk's alone
                z = encode(first_px[:, None], first, step, **norm)
                _check_finite("VAE encoder", z, "fp32", "the VAE must run in fp32: re-export it")
                return FirstFrame(spec.per_token_timestep, spec.dit.patch_size, image_latent=z)
            video = np.zeros((3, s.num_frames, s.height, s.width), dtype=np.float32)  # grey = 0 in [-1, 1]
            video[:, 0] = first_px
            if request.last_image is not None:
                video[:, -1] = preprocess(load_image(request.last_image, arg("last_image")), s.width, s.height, rule)
            z = encode(video, first, step, **norm)
            _check_finite("VAE encoder", z, "fp32", "the VAE must run in fp32: re-export it")
            _, _, h, w = z.shape
            mask = frame_mask(s.num_frames, h, w, spec.vae.stride[0], last=request.last_image is not None)
            tokens = self._clip_tokens(request) if spec.image.clip_size else {}
            return Concat(spec.per_token_timestep, spec.dit.patch_size, condition=np.concatenate([mask, z]),
                          image_tokens=tokens)
        finally:
            self.release(C.VAE_ENCODE_FIRST)
            self.release(C.VAE_ENCODE_STEP)

    def _clip_tokens(self, request: Request) -> dict[str, np.ndarray]:
        """Wan2.1 I2V/FLF2V: the CLIP vision tower on the first (and last) image at their own resolution
        -> {IMAGE_EMBEDS: [1, n_images * T, D]}; the tower is released afterwards."""
        from vidrt.image import clip_pixels, load_image

        spec = self.manifest.model
        assert spec.image is not None
        if C.IMAGE_ENCODER not in self.manifest.components:
            raise PackageError(command_or(f"{self.package} has no image_encoder graph; re-export it with `vidrt "
                                          "export`", "this server's model package has no image_encoder graph, so "
                                          f"it cannot take {arg('image')}"))
        images = [request.image] + ([request.last_image] if request.last_image is not None else [])
        px = np.stack([clip_pixels(load_image(img), spec.image.clip_size) for img in images])  # [n, 3, S, S]
        try:
            out = self.engine(C.IMAGE_ENCODER).run({C.PIXEL_VALUES: px})[C.IMAGE_EMBEDS]  # [n, T, D]
        finally:
            self.release(C.IMAGE_ENCODER)
        _check_finite("image encoder", out, "fp32", "re-export the package")
        return {C.IMAGE_EMBEDS: out.reshape(1, -1, out.shape[-1]).astype(np.float32)}

    def _velocity(self, p: PlannedStep, latents: np.ndarray, context: np.ndarray, cfg_batch: int,
                  stats: RunStats, cond: TextOnly | None = None) -> np.ndarray:
        """The step's velocity. CFG steps: DiT on cond and uncond, then u + g (c - u), as one batch-2 call
        or two batch-1 calls when the memory plan says batch 2 does not fit (cfg_batch == 1; the results
        are the same). CFG-free steps (guidance 1): the conditional velocity of one batch-1 call.
        `cond` shapes the DiT's input and timesteps (vidrt.conditioning; None = text only)."""
        spec = self.manifest.model
        cond = cond or TextOnly(spec.per_token_timestep, spec.dit.patch_size)
        t_row = cond.timestep_row(p.step.timestep, latents)  # [] or [tokens] (TI2V; image mode: 0 on frame 0)
        x = cond.model_input(latents)  # [C_in, F, h, w]: the latents, or + mask and image latents
        engine = self.engine(p.expert)

        def dit(batch: int, rows: slice) -> np.ndarray:
            feeds = {C.LATENTS: np.broadcast_to(x, (batch, *x.shape)),
                     C.TIMESTEP: np.broadcast_to(t_row, (batch, *t_row.shape)), C.CONTEXT: context[rows]}
            feeds.update({k: np.broadcast_to(v, (batch, *v.shape[1:])) for k, v in cond.extra_feeds().items()})
            stats.dit_calls += batch  # DiT evaluations: a batch-2 CFG call is two
            return engine.run(feeds)[C.VELOCITY]

        if not p.cfg:
            return dit(1, slice(0, 1))[0]
        if cfg_batch == 2:
            c, u = dit(2, slice(0, 2))
        else:
            c, u = dit(1, slice(0, 1))[0], dit(1, slice(1, 2))[0]
        return u + np.float32(p.guidance) * (c - u)
    def _expert_dits(self, plan: list[PlannedStep], context: np.ndarray, cfg_batch: int) -> dict[str, ExpertDiT]:
        """The DiT of each expert for the cache policies; an expert with no CFG step runs the prompt row."""
        out = {}
        for expert in dict.fromkeys(p.expert for p in plan):
            rows = context if any(q.cfg for q in plan if q.expert == expert) else context[:1]
            out[expert] = ExpertDiT(self.engine, expert, rows, cfg_batch, self.backend.tensor_ops())
        return out

    def _cache_policy(self, s: Settings, plan: list[PlannedStep], cond: TextOnly, latent_shape: tuple[int, ...],
                      context: np.ndarray, cfg_batch: int) -> CachePolicy:
        """The `--cache` policy of this run. Refused where it would be wrong: image conditioning (its
        DiT inputs are not in the pieces' contracts yet). LoRAs merge into the pieces as into the whole
        graph (same initializer names; each piece gets the tensors it holds: Pipeline.engine)."""
        choice = parse_cache(s.cache)
        if type(cond) is not TextOnly:
            raise UsageError(f"{arg('cache', choice)} is not available for image-to-video yet; "
                             f"leave {arg('cache')} out")
        shape_only = np.zeros(latent_shape, np.float32)
        dits = self._expert_dits(plan, context, cfg_batch)
        return build_policy(choice, self.manifest, [p.expert for p in plan],
                            [cond.timestep_row(p.step.timestep, shape_only) for p in plan], dits.__getitem__,
                            latent_shape)

    def _timestep_row(self, p: PlannedStep, latent_shape: tuple[int, ...]) -> np.ndarray:
        """The DiT's timestep input for one row: a scalar, or (TI2V text-to-video) one per token, every
        token at the step's timestep (image mode would zero frame 0)."""
        spec = self.manifest.model
        if spec.per_token_timestep:
            _, f, h, w = latent_shape
            pt, ph, pw = spec.dit.patch_size
            return np.full(((f // pt) * (h // ph) * (w // pw),), p.step.timestep, dtype=np.float32)
        return np.full((), p.step.timestep, dtype=np.float32)

    def _warn_unknown_words(self, prompt: str) -> None:
        words = self.tokenizer(prompt).unknown_words
        if words and self.manifest.vocabulary:
            self.warn(f"this model does not know {', '.join(sorted(set(words)))}; it knows: "
                      f"{' '.join(self.manifest.vocabulary)}")

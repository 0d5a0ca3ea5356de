"""ONNX -> TensorRT plans for a model package (`vidrt build`). Needs TensorRT and a GPU.

    vidrt build engines/wan2.2-ti2v-5b --precision bf16 --sizes 1280x704 --frames 121

Strongly typed networks only: the precision lives in the ONNX (fp16/bf16 weights and casts from
the export, fp8 as ModelOpt Q/DQ: export/quantize_fp8.py). TensorRT 11 has no precision flags any
more; on 10.x the STRONGLY_TYPED creation flag gives the same behaviour. Per component:

  DiT experts   one optimisation profile per resolution bucket (latent F/H/W fixed per bucket,
                batch 1..2 so CFG can run as one batch-2 or two batch-1 calls)
  text encoder  batch 1..2 x 1..512 tokens; umT5 is never built from an fp16 graph (it overflows)
  VAE           first/step graphs at one fixed tile shape (static: the step replays a CUDA graph),
                fp32; the tile comes from the residency plan for this GPU unless --vae-tile is given
  VAE encoder   image-to-video packages: the streaming encoder graphs (vae_encode_first / _step), fp32,
                untiled (as the reference), one static profile per resolution bucket (the clip's size)
  image encoder Wan2.1 I2V/FLF2V: the CLIP vision tower, one static profile (1 image; FLF2V 2)

Plans go to `<package>/trt-<version>-sm<cc>-<precision>/<component>.plan` with a persistent
timing cache (`timing.cache`, GPU-specific) and `report.json` (TensorRT's device_memory_size_v2
per engine, read by `vidrt plan`); their entries replace older ones in manifest.json (re-hashed,
written atomically).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vidrt.backends.cuda import CudaApi, CudaRuntime, probe
from vidrt.backends.tensorrt import BUILD_ELSEWHERE, engine_dir_name, load_tensorrt, version_tuple
from vidrt.errors import DeviceError, PackageError, UsageError
from vidrt.package import contracts as C
from vidrt.package.contracts import Contract, resolve_shape
from vidrt.package.manifest import Component, Manifest, load_manifest, make_artifact, write_manifest
from vidrt.package.manifest import Engine as EngineEntry
from vidrt.package.registry import ModelSpec

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) check every call below; the module itself loads lazily
    import tensorrt as trt_t

GiB = 2**30
BUILD_PRECISIONS = ("fp16", "bf16", "fp8", "fp32")
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


@dataclass(frozen=True)
class BuildOptions:
    precision: str
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) buckets; () = the model's default sizes
    frames: int | None = None  # None = the model's default
    workspace_bytes: int = 4 * GiB  # builder scratch limit (tactics needing more are skipped)
    optimization_level: int = 3  # 0..5; 3 is TensorRT's default (and demoDiffusion's, to bound build memory)
    weight_streaming: bool = False  # DiT plans streamable from host memory (see `vidrt plan`)
    vae_tile: tuple[int, int] | None = None  # (tile_h, tile_w) latent cells; None = from the residency plan
    gpu_memory: int | None = None  # bytes for the VAE tile choice; None = this GPU's total memory
    text_seq_opt: int = 128  # token count the text encoder is tuned for
    components: tuple[str, ...] = ()  # () = all but the DiT's step-caching pieces (unless cache_pieces)
    check: bool = False  # compare each engine with ONNX Runtime (polygraphy), result in report.json
    cache_pieces: bool = False  # also the "<expert>.<piece>" graphs `--cache` runs (vidrt.caching)
    refit: bool = True  # DiT plans (experts and pieces) refittable: LoRAs at load time (vidrt.backends.refit)


# ---- pure parts (unit-tested) -------------------------------------------------------------------------


def check_component_precision(name: str, comp: Component, precision: str, spec: ModelSpec) -> None:
    """What each graph's ONNX precision must be for a build at `precision`."""
    if name in spec.experts or is_dit_piece(name, spec):
        if comp.precision != precision:
            fix = f"re-export: vidrt export --model CHECKPOINT --opset 23 --precision {precision}"
            raise PackageError(f"{comp.artifact.file} is {comp.precision}, a {precision} build needs a {precision} "
                               f"graph (TensorRT networks are strongly typed: the precision is in the ONNX); {fix}")
    elif name == C.TEXT_ENCODER:
        if comp.precision == "fp16":
            raise PackageError(f"{comp.artifact.file} is fp16: umT5 overflows in fp16 (non-finite embeddings); "
                               f"re-export the text encoder in bf16 or fp32")
    elif name in (C.VAE_FIRST, C.VAE_STEP, C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP):
        if comp.precision != "fp32":
            raise PackageError(f"{comp.artifact.file} is {comp.precision}: the Wan VAE is built in fp32 only "
                               f"(it is precision-sensitive); re-export it in fp32")


def is_dit_piece(name: str, spec: ModelSpec) -> bool:
    """"dit.block0", "dit_low.head": a step-caching piece of a DiT expert (vidrt.export.dit_split)."""
    expert, _, piece = name.partition(".")
    return expert in spec.experts and piece in C.DIT_PIECES


# TensorRT 11.3 "Refitting an Engine" (docs.nvidia.com/deeplearning/tensorrt/11.3.0/inference-library/
# refitting-engines.html, and the 11.3.0 release notes' Known Issues): "Enabling BuilderFlag::kREFIT may
# produce incorrect numerical output compared with a non-refit engine, even when no refit is performed. A
# GEMM bias can be dropped and treated as zero, and that bias is not exposed through the refit API." The
# note names kREFIT only; REFIT_INDIVIDUAL is not said to be safe, so 11.3 builds no refittable plan.
REFIT_BROKEN = ((11, 3),)
REFIT_FLAG = "REFIT_INDIVIDUAL"
REFIT_MIN_VERSION = (10, 2)  # kREFIT_INDIVIDUAL and markWeightsRefittable came with TensorRT 10.2 (NvInfer.h)


def refit_names(name: str, manifest: Manifest, options: BuildOptions, trt_version: str) -> tuple[tuple[str, ...], str]:
    """(weights to mark refittable, why none) for one component's plan.

    BuilderFlag.REFIT_INDIVIDUAL with the DiT's recorded parameters marked (manifest `weights`: every
    parameter a LoRA key can name, `diff`/`diff_b`/`diff_m` included): "all weights are non-refittable
    by default when this flag is enabled" (NvInfer.h BuilderFlag::kREFIT_INDIVIDUAL), so constants that
    are not parameters (RoPE tables, shape values) stay foldable, unlike kREFIT's every-weight refit.
    kREFIT_IDENTICAL cannot take a LoRA ("if the refit weights are not identical to the build-time
    weights, behavior is undefined"); STRIP_PLAN is not used (a plan runs without its ONNX). A step-
    caching piece gets the same list: marking a weight its graph lacks just returns False."""
    spec = manifest.model
    expert = name.partition(".")[0]
    if not options.refit or not (name in spec.experts or is_dit_piece(name, spec)):
        return (), ""
    if options.precision == "fp8":
        return (), "an fp8 DiT takes LoRAs baked in before quantising (vidrt export --lora)"
    if version_tuple(trt_version)[:2] < REFIT_MIN_VERSION:
        return (), f"TensorRT {trt_version} has no BuilderFlag.REFIT_INDIVIDUAL (10.2 and newer)"
    if version_tuple(trt_version)[:2] in REFIT_BROKEN:
        return (), (f"TensorRT {trt_version}: refittable plans may drop GEMM biases (11.3 known issue, "
                    f"docs.nvidia.com/deeplearning/tensorrt/11.3.0/inference-library/refitting-engines.html)")
    weights = manifest.components[expert].weights
    if not weights:
        return (), "the package records no DiT weights (exported before vidrt did; re-export it)"
    return tuple(sorted(ref.initializer for ref in weights.values())), ""


def _bind(contract: Contract, sizes: dict[str, int]) -> dict[str, Shape]:
    return {t.name: resolve_shape(t.shape, sizes) for t in contract.inputs}


def dit_profiles(spec: ModelSpec, contract: Contract, sizes: tuple[tuple[int, int], ...], frames: int) -> list[Profile]:
    """Two static profiles per (width, height): batch 1, then batch 2. One profile of batch 1..2 would
    size the activation memory for batch 2 even when CFG runs as two batch-1 calls to save memory
    (device_memory_size_v2 is the largest profile's); with a profile per batch the backend binds
    get_device_memory_size_for_profile_v2 of the profile in use (TrtEngine.scratch_bytes)."""
    out = []
    for width, height in sizes:
        m = spec.spatial_multiple
        if width % m or height % m:
            raise UsageError(f"size {width}x{height}: width and height must be multiples of {m} for {spec.name}")
        _, f, h, w = spec.latent_shape(width, height, frames)
        dims = {"frames": f, "height": h, "width": w, "tokens": spec.num_tokens(width, height, frames)}
        for batch in (1, 2):
            shapes = _bind(contract, {**dims, "batch": batch})
            out.append({n: (s, s, s) for n, s in shapes.items()})
    return out


def text_profiles(spec: ModelSpec, contract: Contract, seq_opt: int) -> list[Profile]:
    lo = _bind(contract, {"batch": 1, "seq": 1})
    opt = _bind(contract, {"batch": 2, "seq": min(seq_opt, spec.text.text_len)})
    hi = _bind(contract, {"batch": 2, "seq": spec.text.text_len})
    return [{n: (lo[n], opt[n], hi[n]) for n in lo}]


def vae_profiles(contract: Contract, tile: tuple[int, int], scale: int) -> list[Profile]:
    th, tw = tile
    shapes = _bind(contract, {"lat_h": th, "lat_w": tw, "out_h": th * scale, "out_w": tw * scale})
    return [{n: (s, s, s) for n, s in shapes.items()}]


def vae_encoder_profiles(spec: ModelSpec, contract: Contract, sizes: tuple[tuple[int, int], ...],
                         frames: int) -> list[Profile]:
    """One static profile per (width, height): the streaming encoder runs untiled on the whole frame
    (vidrt.vae_encode, as the reference), so its shapes are the clip's: latent lat_h x lat_w, video
    stride x that (1 frame into vae_encode_first, 4 into vae_encode_step). An image-to-video clip
    takes its size from the image, so that size must be one of the built buckets, as for the DiT."""
    out = []
    for width, height in sizes:
        _, _, h, w = spec.latent_shape(width, height, frames)
        shapes = _bind(contract, {"lat_h": h, "lat_w": w})
        out.append({n: (s, s, s) for n, s in shapes.items()})
    return out


def image_encoder_profiles(spec: ModelSpec, contract: Contract) -> list[Profile]:
    """The CLIP vision tower runs once per clip on the start image (FLF2V: start and end image
    stacked, pipeline._clip_tokens) at its fixed input side: one static profile."""
    assert spec.image is not None
    shapes = _bind(contract, {"images": 2 if spec.image.last_image else 1})
    return [{n: (s, s, s) for n, s in shapes.items()}]


def choose_vae_tile(spec: ModelSpec, contract: Contract, sizes: tuple[tuple[int, int], ...], frames: int,
                    budget: int, precision: str = "bf16") -> tuple[int, int]:
    """The residency plan's tile for the largest size bucket, at the build's precision (it serves
    the smaller sizes too: the runtime pads a frame smaller than the tile). At run time the pipeline
    decodes with exactly this tile (TrtBackend.vae_tile); the plan only checks that it fits."""
    from vidrt.backends.residency import make_plan

    width, height = max(sizes, key=lambda s: s[0] * s[1])
    plan = make_plan(spec, width, height, frames, budget, precision, contracts={C.VAE_STEP: contract})
    return plan.vae_tile.tile_shape


# ---- TensorRT ---------------------------------------------------------------------------------------------


def network_flags(trt: ModuleType) -> int:
    """Strongly typed: the default and only mode on TensorRT 11; an explicit flag on 10.x."""
    if version_tuple(str(trt.__version__))[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)  # a memoryview of TensorRT's IHostMemory is written without a copy
    os.replace(tmp, path)


def build_plan(trt: ModuleType, onnx_path: Path, profiles: list[Profile], options: BuildOptions,
               timing_cache: Path, *, streamable: bool = False,
               refittable: tuple[str, ...] = ()) -> tuple[memoryview, dict[str, Any]]:
    """Build one plan. Returns (a view of TensorRT's serialised plan, report); the caller writes it
    and drops it (an A14B plan is 14-28 GB: no bytes() copy). `refittable`: weight names to mark
    refittable under BuilderFlag.REFIT_INDIVIDUAL (refit_names); the report's "refit" says how many
    the plan exposes to the refit API and which marked ones it does not ("lost")."""
    logger: trt_t.Logger = trt.Logger(trt.Logger.WARNING)
    builder: trt_t.Builder | None = trt.Builder(logger)
    if builder is None:
        raise DeviceError("TensorRT could not create a builder (CUDA initialisation failed; see `vidrt doctor`)")
    network: trt_t.INetworkDefinition = builder.create_network(network_flags(trt))
    parser: trt_t.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise PackageError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors[:400]} "
                           f"(opset 23 Attention/RMSNormalization need TensorRT >= 10.15)")
    config: trt_t.IBuilderConfig = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    # TF32 is on by default (pyCoreDoc BuilderFlag.TF32: "Enabled by default"; still a flag in 11.x,
    # not one of the removed weak-typing flags). It rounds fp32 GEMM/conv inputs to 10 mantissa bits:
    # off, so the fp32 VAE and the fp32 islands of the low-precision graphs (norms, modulation, time
    # projection) compute in fp32 as exported.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    if streamable:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    # The ONNX parser names each weight after its initializer (INetworkDefinition::setWeightsName,
    # "Refitting an Engine"); markWeightsRefittable "returns false if the weights do not exist or cannot be
    # refitted" (NvInfer.h): a step-caching piece marks the part of the DiT's parameters it holds.
    marked = [n for n in refittable if network.mark_weights_refittable(n)] if refittable else []
    if marked:
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)  # "cannot be used together with kREFIT"
    cache: trt_t.ITimingCache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    for prof in profiles:
        p: trt_t.IOptimizationProfile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(p)
    t0 = time.perf_counter()
    plan: trt_t.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        raise DeviceError(f"TensorRT could not build {onnx_path.name} (see its log above); try a smaller "
                          f"--workspace, fewer --sizes or --optimization-level 2")
    data = memoryview(plan)
    timing: trt_t.ITimingCache = config.get_timing_cache()
    _write_atomic(timing_cache, bytes(memoryview(timing.serialize())))
    report: dict[str, Any] = {"build_seconds": round(time.perf_counter() - t0, 1), "plan_bytes": data.nbytes}
    runtime: trt_t.Runtime = trt.Runtime(logger)
    engine: trt_t.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is not None:
        report["device_memory_bytes"] = int(engine.device_memory_size_v2)
        report["profile_device_memory_bytes"] = [int(engine.get_device_memory_size_for_profile_v2(i))
                                                 for i in range(engine.num_optimization_profiles)]
        report["weight_bytes"] = int(engine.streamable_weights_size) if streamable else data.nbytes
        if marked:
            report["refit"] = _refit_report(trt, engine, logger, marked)
        del engine
    return data, report


def _refit_report(trt: ModuleType, engine: trt_t.ICudaEngine, logger: trt_t.Logger,
                  marked: list[str]) -> dict[str, Any]:
    """What the built plan lets a refit change: every marked weight must be listed by the refit API
    (Refitter.get_all_weights). One that is not can never take a LoRA -- and a marked GEMM bias that is
    not is TensorRT 11.3's known issue (the bias "dropped and treated as zero")."""
    exposed = set(trt.Refitter(engine, logger).get_all_weights()) if engine.refittable else set()
    lost = [n for n in marked if n not in exposed]
    return {"flag": REFIT_FLAG, "marked": len(marked), "weights": len(marked) - len(lost), "lost": lost[:8],
            "lost_count": len(lost)}


def build_package(package: Path | str, options: BuildOptions, *, trt_mod: ModuleType | None = None,
                  compute_capability: str | None = None, total_memory: int | None = None,
                  builder: Callable[..., tuple[bytes | memoryview, dict[str, Any]]] = build_plan,
                  log: Callable[[str], None] = print, device: int = 0, cuda: CudaApi | None = None,
                  checker: Callable[..., dict[str, Any]] | None = None) -> Manifest:
    """Build every component's plan and record them in the manifest. Returns the new manifest.
    `device`: the GPU to build on (`--device N`); it is made current before TensorRT creates its
    Builder (TensorRT builds on the calling thread's current device), and the plans carry its
    compute capability."""
    package = Path(package)
    if options.precision not in BUILD_PRECISIONS:
        raise UsageError(f"--precision {options.precision!r}: use one of {', '.join(BUILD_PRECISIONS)}")
    manifest = load_manifest(package, verify=True)
    spec = manifest.model
    trt = trt_mod if trt_mod is not None else load_tensorrt(BUILD_ELSEWHERE)
    if compute_capability is None:
        gpu = probe()
        if not gpu.ok:
            raise DeviceError(f"building TensorRT engines needs the target GPU: {gpu.reason}")
        if not 0 <= device < len(gpu.devices):
            raise UsageError(f"--device {device}: this machine has {len(gpu.devices)} GPU(s), "
                             f"0..{len(gpu.devices) - 1} (`vidrt doctor` lists them)")
        chosen = gpu.devices[device]
        compute_capability, total_memory = chosen.compute_capability, chosen.total_bytes
        if cuda is None:
            cuda = CudaRuntime(chosen.index)  # makes it the current device
    if cuda is not None:
        cuda.set_device(device)
    if options.precision == "fp8" and version_tuple(compute_capability) < (8, 9):
        raise DeviceError(f"fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU is "
                          f"{compute_capability}: build bf16 or fp16 instead")
    sizes = options.sizes or spec.sampling.sizes
    frames = options.frames or spec.sampling.frames
    if (frames - 1) % spec.vae.stride[0]:
        raise UsageError(f"--frames {frames}: must be 4k+1")
    version = str(trt.__version__)
    folder = engine_dir_name(version, compute_capability, options.precision)
    out_dir = package / folder
    out_dir.mkdir(exist_ok=True)
    cache = out_dir / "timing.cache"
    names = options.components or tuple(n for n in manifest.components
                                        if options.cache_pieces or not is_dit_piece(n, spec))
    unknown = set(names) - set(manifest.components)
    if unknown:
        raise UsageError(f"unknown component(s) {', '.join(sorted(unknown))}; the package has "
                         f"{', '.join(manifest.components)}")
    for name in names:
        check_component_precision(name, manifest.components[name], options.precision, spec)
    report_path = out_dir / "report.json"
    reports: dict[str, Any] = json.loads(report_path.read_text()).get("engines", {}) if report_path.is_file() else {}
    tile = options.vae_tile
    new: list[EngineEntry] = []
    for name in names:
        comp = manifest.components[name]
        buckets: tuple[tuple[int, int, int], ...] = ()
        if name in spec.experts or is_dit_piece(name, spec):  # pieces: same dims (batch, tokens, ...)
            profiles = dit_profiles(spec, comp.contract, sizes, frames)
            buckets = tuple((w, h, frames) for w, h in sizes)
        elif name == C.TEXT_ENCODER:
            profiles = text_profiles(spec, comp.contract, options.text_seq_opt)
        elif name in (C.VAE_FIRST, C.VAE_STEP):
            if tile is None:
                step = manifest.components.get(C.VAE_STEP, comp).contract
                budget = options.gpu_memory or total_memory or 24 * 10**9
                tile = choose_vae_tile(spec, step, sizes, frames, budget, options.precision)
                log(f"VAE tile {tile[0]}x{tile[1]} latent cells (residency plan for {budget / GiB:.1f} GiB)")
            profiles = vae_profiles(comp.contract, tile, spec.vae.stride[1])
            s = spec.vae.stride[1]
            buckets = ((tile[1] * s, tile[0] * s, 1),)  # the tile in pixels (width, height, 1 latent frame)
        elif name in (C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP):
            profiles = vae_encoder_profiles(spec, comp.contract, sizes, frames)
            buckets = tuple((w, h, frames) for w, h in sizes)
        elif name == C.IMAGE_ENCODER and spec.image is not None:
            profiles = image_encoder_profiles(spec, comp.contract)
        else:
            raise UsageError(f"do not know how to profile component {name!r}")
        marks, why_not = refit_names(name, manifest, options, version)
        if why_not:
            log(f"{name}: built without refit ({why_not}); LoRAs on it: vidrt export --lora, then vidrt build")
        log(f"building {name} ({comp.precision}{', refittable' if marks else ''}) -> {folder}/{name}.plan, "
            f"{len(profiles)} profile(s)")
        streamable = options.weight_streaming and name in spec.experts
        data, report = builder(trt, package / comp.artifact.file, profiles, options, cache, streamable=streamable,
                               refittable=marks)
        refit = report.get("refit") or {}
        if not refit.get("marked"):
            marks = ()  # no weight of this graph was marked (or the plan could not be checked): not refittable
        elif refit.get("lost_count"):
            # a plan whose refit would silently miss weights (or zeroed a GEMM bias) is not kept: rebuilt
            # as a plain plan, LoRAs refused on it with one line
            lost = ", ".join(refit["lost"])
            log(f"warning: {name}: TensorRT {version} does not expose {refit['lost_count']} marked "
                f"weight(s) to refit ({lost}); a dropped GEMM bias is TensorRT 11.3's known issue "
                f"(refitting-engines.html); rebuilding {name} without refit")
            del data
            data, report = builder(trt, package / comp.artifact.file, profiles, options, cache,
                                   streamable=streamable, refittable=())
            report["refit_dropped"] = refit
            marks = ()
        _write_atomic(out_dir / f"{name}.plan", data)
        if options.check:
            report["check"] = _check(package / comp.artifact.file, data, comp, profiles[0], spec, options, checker,
                                     log)
        del data
        if name in spec.experts and report.get("profile_device_memory_bytes"):
            # what each profile is (dit_profiles: per size, batch 1 then batch 2), for `vidrt plan`
            shapes = [(w, h, frames, b) for w, h in sizes for b in (1, 2)]
            report["profiles"] = [{"width": w, "height": h, "frames": f, "batch": b, "device_memory_bytes": m}
                                  for (w, h, f, b), m in zip(shapes, report["profile_device_memory_bytes"],
                                                             strict=False)]
        reports[name] = report
        artifact = make_artifact(package, f"{folder}/{name}.plan")
        new.append(EngineEntry(name, artifact, comp.precision, version, compute_capability, buckets,
                               refit=REFIT_FLAG if marks else ""))
    _write_atomic(report_path, (json.dumps({"tensorrt_version": version, "compute_capability": compute_capability,
                                            "precision": options.precision, "engines": reports}, indent=1)
                                + "\n").encode())
    replaced = {e.artifact.file for e in new}
    engines = tuple(e for e in manifest.engines if e.artifact.file not in replaced) + tuple(new)
    manifest = dataclasses.replace(manifest, engines=engines)
    write_manifest(package, manifest)
    return manifest


def _check(onnx_path: Path, plan: bytes | memoryview, comp: Component, profile: Profile, spec: ModelSpec,
           options: BuildOptions, checker: Callable[..., dict[str, Any]] | None,
           log: Callable[[str], None]) -> dict[str, Any]:
    """--check: the engine vs ONNX Runtime on the first profile's opt shapes (export/check_engines.py)."""
    from vidrt.export.check_engines import check_engine, check_inputs, trt_runner

    inputs = check_inputs(comp.contract, profile, spec.text.vocab_size)
    if inputs is None:
        log(f"check {comp.name}: skipped (bfloat16 inputs; use polygraphy run {onnx_path.name} --trt --onnxrt)")
        return {"passed": None, "skipped": "bfloat16 inputs"}
    shapes, ranges = inputs
    precision = options.precision if comp.name in spec.experts else comp.precision
    result = (checker or (lambda o, p, *a: check_engine(o, trt_runner(p), *a)))(onnx_path, plan, shapes, precision,
                                                                                  ranges)
    log(f"check {comp.name}: {'passed' if result['passed'] else 'FAILED'} vs ONNX Runtime "
        f"(mean error tolerance {result.get('atol')})")
    return result


__all__ = ["BuildOptions", "BUILD_PRECISIONS", "REFIT_FLAG", "refit_names", "check_component_precision",
           "dit_profiles", "text_profiles", "vae_profiles", "vae_encoder_profiles", "image_encoder_profiles",
           "choose_vae_tile", "network_flags", "build_plan", "build_package"]


"""manifest.json of a model package: read, validate, write.

A package is one folder (DESIGN.md §2). The manifest names every artifact with its sha256, the
model spec (architecture, latent statistics, sampling defaults) and each component's I/O
contract. The runtime trusts nothing that the manifest does not vouch for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from vidrt.errors import PackageError
from vidrt.package import contracts as C
from vidrt.package.contracts import Contract
from vidrt.package.registry import ModelSpec, from_dict, to_dict
from vidrt.package.verified import VerifiedFiles

SCHEMA_VERSION = 1
# Component.cpu_artifacts keys: "avx512f" = x86 CPUs with AVX-512F, where ONNX Runtime's MLAS runs its
# NCHWc convolutions on 16-channel blocks (8 with AVX2)
CPU_FEATURES = ("avx512f",)
REFIT_FLAGS = ("", "REFIT", "REFIT_INDIVIDUAL")  # Engine.refit: TensorRT BuilderFlag names ("" = not refittable)
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A file of the package. `data_file` is the ONNX external-data file, if the graph has one."""

    file: str
    sha256: str
    size_bytes: int
    data_file: str | None = None
    data_sha256: str | None = None
    data_size_bytes: int | None = None

    def files(self) -> list[tuple[str, str, int]]:
        out = [(self.file, self.sha256, self.size_bytes)]
        if self.data_file is not None:
            assert self.data_sha256 is not None and self.data_size_bytes is not None
            out.append((self.data_file, self.data_sha256, self.data_size_bytes))
        return out


@dataclass(frozen=True)
class WeightRef:
    """Where one model parameter lives in an exported graph (recorded at export; vidrt.lora merges into it).

    initializer  the ONNX initializer's name (also the TensorRT weight name the ONNX parser gives it)
    transposed   the exporter stored a Linear weight [out, in] as its transpose [in, out] (MatMul layout)
    offset, length  its bytes in the component's external-data file
    dtype, shape    as stored (dtype a numpy name; "bfloat16" = uint16 bits)"""

    initializer: str
    transposed: bool
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Component:
    """One exported graph (ONNX) and its contract. `weights`: DiT graphs only, diffusers parameter name
    ("blocks.0.attn1.to_q.weight") -> WeightRef; empty in packages exported before vidrt recorded it."""

    name: str
    artifact: Artifact
    contract: Contract
    precision: str  # "fp32" | "fp16" | "bf16" | "fp8"
    opset: int
    weights: dict[str, WeightRef] = field(default_factory=dict)
    # CPU feature (CPU_FEATURES) -> the same graph in a form faster on CPUs that have it, for ONNX Runtime's
    # CPU provider only (the VAE step graphs of models with 8-channel convs: vidrt.export.onnx_optimize,
    # frame pairs). Absent in older manifests and where the export wrote none (not written when empty);
    # a key this vidrt does not know is verified and never opened.
    cpu_artifacts: dict[str, Artifact] = field(default_factory=dict)

    def artifact_for(self, cpu_features: frozenset[str]) -> Artifact:
        """The file to open on a CPU with `cpu_features` (vidrt.backends.ort.cpu_features); the default
        form where the package has no form for them."""
        return next((a for f, a in self.cpu_artifacts.items() if f in cpu_features), self.artifact)


@dataclass(frozen=True)
class Engine:
    """A TensorRT plan built from a component for one GPU and TensorRT version."""

    component: str
    artifact: Artifact
    precision: str
    tensorrt_version: str
    compute_capability: str  # "8.9"
    profiles: tuple[tuple[int, int, int], ...] = ()  # (width, height, frames) buckets
    # The TensorRT builder flag that made the plan refittable ("REFIT_INDIVIDUAL": `vidrt build` marks the
    # DiT's recorded parameters, vidrt.export.build_engines), "" for a plan that cannot be refitted. The
    # TensorRT backend applies LoRAs at load time by refit (vidrt.backends.refit) only to refittable plans.
    refit: str = ""


@dataclass(frozen=True)
class CacheTable:
    """Step-cache statistics of a package, measured by `vidrt cache calibrate` with its own sampler
    (MagCache's calibration, fast_paths.md C.2; a TeaCache-style polynomial fit, C.1).

    mag_ratios   2*steps values, cond/uncond interleaved as in MagCache's tables, [1.0, 1.0] first:
                 mean over tokens of ||R_t|| / ||R_t-1|| of the block-stack residual R
    teacache_e / teacache_e0   numpy.poly1d coefficients (highest power first) mapping the relative L1
                 change of the time embedding e (e0) to the relative L1 change of the DiT output
    """

    steps: int
    shift: float
    scheduler: str
    mag_ratios: tuple[float, ...]
    teacache_e: tuple[float, ...] = ()
    teacache_e0: tuple[float, ...] = ()


@dataclass(frozen=True)
class BakedLora:
    """A LoRA merged into the DiT weights at export (`vidrt export --lora`): the file by its name (no
    folder), its sha256 and size in bytes, the strength it was baked at, and its expert (None = every
    expert). The runtime merges no file with this sha256 into that expert again (vidrt.lora)."""

    file: str
    sha256: str
    size_bytes: int
    strength: float
    expert: str | None = None


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    model: ModelSpec
    tokenizer: Artifact
    components: dict[str, Component]
    vidrt_version: str = ""
    export_inputs: dict[str, str] = field(default_factory=dict)  # stage -> fingerprint of its inputs
    vocabulary: tuple[str, ...] = ()  # known prompt words, for small closed-vocabulary models
    engines: tuple[Engine, ...] = ()
    loras: tuple[Artifact, ...] = ()  # LoRA files the package ships (its recipes, model.recipes, name them)
    cache_table: CacheTable | None = None  # `vidrt cache calibrate`; None: published tables only
    baked_loras: tuple[BakedLora, ...] = ()  # `vidrt export --lora`; absent in older manifests: none


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def make_artifact(package: Path, file: str, data_file: str | None = None) -> Artifact:
    """Hash a file (and its external-data file) that already sits in the package folder."""
    p = package / file
    art = Artifact(file=file, sha256=sha256_file(p), size_bytes=p.stat().st_size)
    if data_file is not None and (package / data_file).exists():
        d = package / data_file
        art = Artifact(file, art.sha256, art.size_bytes, data_file, sha256_file(d), d.stat().st_size)
    return art


def write_manifest(package: Path, manifest: Manifest) -> None:
    """Atomic write: a reader never sees a half-written manifest."""
    tmp = package / (MANIFEST_NAME + ".tmp")
    raw = to_dict(manifest)
    for comp in raw["components"].values():  # optional and usually empty: keeps such packages readable by
        if not comp["cpu_artifacts"]:        # a vidrt from before the field (it refuses unknown fields)
            del comp["cpu_artifacts"]
    tmp.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, package / MANIFEST_NAME)


def _inside(package: Path, name: str) -> Path:
    """Resolve an artifact name, refusing anything that escapes the package folder (.., abs, symlinks)."""
    try:
        root = package.resolve()
        p = (package / name).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loop, name too long, NUL byte
        raise PackageError(f"{package}: artifact {name!r} cannot be resolved (symlink loop?); "
                           f"re-export the package") from None
    if Path(name).is_absolute() or root not in p.parents:
        raise PackageError(f"{package}: artifact {name!r} points outside the package folder; re-export the package")
    return p


def load_manifest(package: Path | str, verify: bool = True) -> Manifest:
    """Read and validate `package/manifest.json`. With verify, check each artifact's size and sha256."""
    package = Path(package)
    path = package / MANIFEST_NAME
    if package.exists() and not package.is_dir():
        folder = package.parent if package.name == MANIFEST_NAME else "that folder"
        raise PackageError(f"{package} is a file, not a model package folder (the folder that holds "
                           f"{MANIFEST_NAME}); pass {folder}")
    if not package.is_dir():
        raise PackageError(f"model package {package} does not exist; export one with `vidrt export --model DIR`")
    if not path.is_file():
        raise PackageError(f"{package} has no {MANIFEST_NAME}: not a model package (export one with `vidrt export`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PackageError(f"{path} cannot be read ({exc.strerror}); check its permissions or re-export") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting or number lengths
        reason = " ".join(str(exc).split())[:200]
        raise PackageError(f"{path} is not valid JSON ({reason}); re-export the package") from None
    if not isinstance(raw, dict) or type(raw.get("schema_version")) is not int \
            or raw["schema_version"] != SCHEMA_VERSION:
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        raise PackageError(f"{path} has schema version {str(found)[:40]!r}, this vidrt reads {SCHEMA_VERSION}; "
                           f"re-export with this version (`vidrt export`)")
    try:
        manifest = from_dict(Manifest, raw)
        check_manifest(manifest)
    except (TypeError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]  # one line, bounded (values come from the file)
        if reason.startswith("unknown field"):  # from_dict: a field this vidrt has no use for
            raise PackageError(f"{path} has fields this vidrt does not know ({reason}): a newer vidrt wrote it; "
                               f"upgrade vidrt, or re-export the package with this one") from None
        raise PackageError(f"{path} is malformed ({reason}); re-export the package") from None
    if verify:
        verify_artifacts(package, manifest)
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIM = re.compile(r"([1-9][0-9]*\*)?[A-Za-z_][A-Za-z0-9_]*")
_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}
_VAE_DIMS = {"lat_h", "lat_w", "out_h", "out_w"}
_STREAM_IN = {C.TOKENS, C.TIMESTEP_PROJ, C.CONTEXT_EMB, C.ROPE_COS, C.ROPE_SIN}
_PIECE_IO = {C.TEXT_EMBED: ({C.CONTEXT}, {C.CONTEXT_EMB}), C.TIME_EMBED: ({C.TIMESTEP}, {C.TEMB, C.TIMESTEP_PROJ}),
             C.PATCH_EMBED: ({C.LATENTS}, {C.TOKENS, C.ROPE_COS, C.ROPE_SIN}),
             C.BLOCK0: (_STREAM_IN, {C.BLOCK_OUT}), C.BLOCKS_REST: (_STREAM_IN, {C.BLOCK_OUT}),
             C.HEAD: ({C.TOKENS, C.TEMB}, {C.VELOCITY})}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _check_artifact(art: Artifact) -> None:
    for name, digest, size in [(art.file, art.sha256, art.size_bytes)] + (
            [(art.data_file, art.data_sha256, art.data_size_bytes)] if art.data_file is not None else []):
        _check(isinstance(name, str) and 0 < len(name) <= 255 and "\x00" not in name, f"bad artifact name {name!r}")
        _check(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None,
               f"{name}: sha256 is not 64 hex digits")
        _check(isinstance(size, int) and size >= 0, f"{name}: bad size {size!r}")
    _check(art.data_file is not None or (art.data_sha256 is None and art.data_size_bytes is None),
           f"{art.file}: data_sha256/data_size_bytes without data_file")


def _check_contract(name: str, contract: Contract, inputs: set[str], outputs: set[str], dims: set[str] | None) -> None:
    for kind, tensors, needed in (("input", contract.inputs, inputs), ("output", contract.outputs, outputs)):
        names = [t.name for t in tensors]
        _check(len(set(names)) == len(names), f"{name}: duplicate {kind} names")
        _check(needed <= set(names), f"{name}: {kind}s lack {sorted(needed - set(names))}")
        for t in tensors:
            _check(t.dtype in _DTYPES, f"{name}.{t.name}: unknown dtype {t.dtype!r}")
            for d in t.shape:
                if isinstance(d, int):
                    _check(d >= 0, f"{name}.{t.name}: negative dim {d}")
                else:
                    _check(_DIM.fullmatch(d) is not None and (dims is None or d.rpartition("*")[2] in dims),
                           f"{name}.{t.name}: bad symbolic dim {d!r}")


def check_manifest(m: Manifest) -> None:
    """What the runtime relies on beyond the types: raises ValueError naming the first problem.

    The manifest itself is not hashed, so every number and name in it is checked here: a hand-edited
    or damaged manifest must fail at load with one line, not deep inside a run."""
    spec = m.model
    ints = {"dit.dim": spec.dit.dim, "dit.ffn_dim": spec.dit.ffn_dim, "dit.num_layers": spec.dit.num_layers,
            "dit.num_heads": spec.dit.num_heads, "dit.in_channels": spec.dit.in_channels,
            "dit.out_channels": spec.dit.out_channels, "dit.freq_dim": spec.dit.freq_dim,
            "dit.text_dim": spec.dit.text_dim, "vae.z_dim": spec.vae.z_dim, "vae.base_dim": spec.vae.base_dim,
            "vae.decoder_base_dim": spec.vae.decoder_base_dim, "text.vocab_size": spec.text.vocab_size,
            "text.d_model": spec.text.d_model, "text.d_ff": spec.text.d_ff, "text.num_layers": spec.text.num_layers,
            "text.num_heads": spec.text.num_heads, "text.num_buckets": spec.text.num_buckets,
            "text.text_len": spec.text.text_len, "sampling.steps": spec.sampling.steps,
            "sampling.frames": spec.sampling.frames, "sampling.fps": spec.sampling.fps,
            "sampling.num_train_timesteps": spec.sampling.num_train_timesteps}
    ints.update({f"dit.patch_size[{i}]": v for i, v in enumerate(spec.dit.patch_size)})
    ints.update({f"vae.stride[{i}]": v for i, v in enumerate(spec.vae.stride)})
    for key, v in ints.items():
        _check(1 <= v <= 1 << 20, f"model.{key} = {v} is out of range")
    _check(len(spec.vae.latents_mean) == len(spec.vae.latents_std) == spec.vae.z_dim,
           "vae.latents_mean/latents_std do not have z_dim values")
    f32 = float(np.finfo(np.float32).max)
    _check(all(math.isfinite(x) and abs(x) < f32 for x in spec.vae.latents_mean), "vae.latents_mean not finite")
    _check(all(math.isfinite(x) and 0 < x < f32 for x in spec.vae.latents_std), "vae.latents_std not positive")
    s = spec.sampling
    for key, x in (("shift", s.shift), ("guidance_high_noise", s.guidance_high_noise),
                   ("guidance_low_noise", s.guidance_low_noise)):
        _check(math.isfinite(x), f"sampling.{key} = {x} is not finite")
    _check(len(s.sizes) > 0 and all(1 <= v <= 1 << 16 for wh in s.sizes for v in wh), "sampling.sizes are invalid")
    two = spec.experts == ("dit_high", "dit_low")
    _check(spec.experts == ("dit",) or two, f"experts {spec.experts!r} are neither ('dit',) nor two experts")
    _check((s.boundary is not None) == two and (s.boundary is None or 0.0 < s.boundary < 1.0),
           f"sampling.boundary {s.boundary!r} does not fit experts {spec.experts!r}")
    if spec.image is not None:
        _check(spec.image.mode in ("first_frame", "concat"), f"image.mode {spec.image.mode!r} is unknown")
        _check(spec.image.resize in ("area_bicubic", "cover_lanczos"), f"image.resize {spec.image.resize!r} is unknown")
        _check((spec.dit.image_dim is None) == (spec.image.clip_size == 0), "dit.image_dim and image.clip_size "
               "must be set together")
        _check(spec.image.mode != "concat" or spec.dit.in_channels == 2 * spec.vae.z_dim + spec.vae.stride[0],
               f"a concat image model needs dit.in_channels = 2 z_dim + {spec.vae.stride[0]} (mask)")
    _check_artifact(m.tokenizer)
    # (an image model's encoder graphs are checked when an image is given: a TI2V package exported
    # before vidrt had them still runs text-to-video)
    needed = (C.TEXT_ENCODER, *spec.experts, C.VAE_FIRST, C.VAE_STEP)
    _check(set(needed) <= set(m.components), f"components lack {sorted(set(needed) - set(m.components))}")
    for name, comp in m.components.items():
        _check_artifact(comp.artifact)
        for art in comp.cpu_artifacts.values():  # a form for a CPU feature this vidrt does not know is
            _check_artifact(art)                  # verified but never opened (the default form always is)
        for param, ref in comp.weights.items():
            _check(comp.artifact.data_file is not None and ref.offset >= 0 and ref.length >= 0
                   and ref.dtype in _DTYPES and all(isinstance(d, int) and d >= 0 for d in ref.shape),
                   f"{name}: bad weight record for {param}")
        if name == C.TEXT_ENCODER:
            _check_contract(name, comp.contract, {C.INPUT_IDS, C.ATTENTION_MASK}, {C.TEXT_HIDDEN}, None)
        elif name in spec.experts:
            _check_contract(name, comp.contract, {C.LATENTS, C.TIMESTEP, C.CONTEXT}, {C.VELOCITY}, None)
        elif name.partition(".")[0] in spec.experts and name.partition(".")[2] in _PIECE_IO:
            ins, outs = _PIECE_IO[name.partition(".")[2]]
            _check_contract(name, comp.contract, ins, outs, None)
        elif name in (C.VAE_FIRST, C.VAE_STEP):
            caches = {t.name for t in comp.contract.outputs if t.name.startswith("cache_out_")}
            ins = {C.VAE_LATENT} | ({n.replace("_out_", "_in_") for n in caches} if name == C.VAE_STEP else set())
            _check_contract(name, comp.contract, ins, {C.VAE_FRAMES}, _VAE_DIMS)
        elif name == C.IMAGE_ENCODER:
            _check_contract(name, comp.contract, {C.PIXEL_VALUES}, {C.IMAGE_EMBEDS}, None)
        elif name in (C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP):
            caches = {t.name for t in comp.contract.outputs if t.name.startswith("cache_out_")}
            ins = {C.VAE_VIDEO} | ({n.replace("_out_", "_in_") for n in caches} if name == C.VAE_ENCODE_STEP
                                   else set())
            _check_contract(name, comp.contract, ins, {C.VAE_LATENT}, _VAE_DIMS)
    shipped = {a.file for a in m.loras}
    for art in m.loras:
        _check_artifact(art)
    for r in spec.recipes:
        _check(all(slot.file is None or slot.file in shipped for slot in r.loras),
               f"recipe {r.name!r} names a LoRA file the package does not list in `loras`")
        _check(r.expert_ok(spec.experts), f"recipe {r.name!r} names an expert the model does not have")
    for baked in m.baked_loras:
        _check(bool(_SHA256.fullmatch(baked.sha256)) and baked.size_bytes >= 0 and math.isfinite(baked.strength)
               and (baked.expert is None or baked.expert in spec.experts), f"bad baked_loras record {baked.file!r}")
    for engine in m.engines:
        _check_artifact(engine.artifact)
        _check(engine.component in m.components, f"engine for unknown component {engine.component!r}")
        _check(engine.refit in REFIT_FLAGS, f"engine {engine.component}: unknown refit flag {engine.refit!r}")


def all_artifacts(manifest: Manifest) -> list[Artifact]:
    return [manifest.tokenizer] + [a for c in manifest.components.values() for a in (c.artifact,
                                                                                      *c.cpu_artifacts.values())] + \
        [e.artifact for e in manifest.engines] + list(manifest.loras)


def verify_artifacts(package: Path, manifest: Manifest) -> None:
    """Size and sha256 of every artifact. A file whose identity is unchanged since it last matched
    is not read again (vidrt.package.verified; VIDRT_VERIFY=full hashes everything)."""
    verified = VerifiedFiles()
    checked: dict[str, str] = {}  # file -> sha256: the DiT pieces share one external-data file; hash it once
    try:
        for art in all_artifacts(manifest):
            for name, digest, size in art.files():
                if name in checked:
                    if checked[name] != digest:
                        raise PackageError(f"{package}: the manifest gives {name} two different sha256s; "
                                           f"re-export the package")
                    continue
                checked[name] = digest
                p = _inside(package, name)
                if not p.is_file():
                    raise PackageError(f"{package}: {name} is missing; re-export the package (`vidrt export`)")
                if p.stat().st_size != size:
                    raise PackageError(f"{package}: {name} has {p.stat().st_size} bytes, the manifest says {size} "
                                       f"(truncated or replaced); re-export the package")
                if verified.known(p, digest):
                    continue
                try:
                    actual = sha256_file(p)
                except OSError as exc:
                    raise PackageError(f"{package}: {name} cannot be read ({exc.strerror}); check its permissions "
                                       f"or re-export the package") from None
                if actual != digest:
                    raise PackageError(f"{package}: {name} does not match its sha256 in the manifest (modified or "
                                       f"corrupt); re-export the package")
                verified.remember(p, digest)
    finally:
        verified.save()  # what did match is remembered even when a later file fails


def artifact_path(package: Path | str, name: str) -> Path:
    return _inside(Path(package), name)

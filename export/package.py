"""`vidrt export`: a checkpoint folder -> a model package (DESIGN.md §2).

Before anything is written, every weight of every component is checked against the model its
config describes (keys, shapes, float dtypes; headers only: Checkpoint.check_weights).

Stages: tokenizer, text_encoder, one per DiT expert (the whole graph and, where it can be cut, its
step-caching pieces: vidrt.export.dit_split), vae (both decoder graphs), and for
image-to-video models vae_encoder (both streaming encoder graphs) and, for Wan2.1 I2V/FLF2V,
image_encoder (the CLIP vision tower). A stage is
skipped when its inputs' fingerprint (checkpoint files + opset + precision + vidrt version +
model spec) equals the one in the existing manifest and its files still hash right. A lock file
serialises concurrent exports into one folder. Stages write into a staging folder inside the
package folder (`.export-staging-<pid>/`); only when every stage has succeeded are their files
renamed into place and the manifest written, last and atomically. A failed export therefore leaves
the folder as it was (a folder it created is removed again); a killed one leaves either the old
manifest (whose hashes then no longer match anything rewritten) or none, and its staging folder is
removed by the next export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import vidrt
from tqdm import tqdm
from vidrt.backends.residency import DEFAULT_FP8_SCOPE
from vidrt.errors import PackageError, UsageError, VidrtError, cannot_write_in
from vidrt.export.checkpoints import Checkpoint, open_checkpoint
from vidrt.export.components import PRECISIONS
from vidrt.export.dit_split import split_dit
from vidrt.export.onnx_export import (
    check_opset,
    data_file_name,
    export_dit,
    export_image_encoder,
    export_text_encoder,
    export_vae_decoder,
    export_vae_encoder,
    text_encoder_precision,
    weight_refs,
)
from vidrt.export.package_extras import bake_loras, baked_records, check_loras, package_recipes
from vidrt.package.contracts import (
    DIT_PIECES,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    VAE_ENCODE_FIRST,
    VAE_ENCODE_STEP,
    VAE_FIRST,
    VAE_STEP,
    Contract,
    dit_piece,
)
from vidrt.package.manifest import (
    CPU_FEATURES,
    SCHEMA_VERSION,
    Artifact,
    Component,
    Manifest,
    WeightRef,
    load_manifest,
    make_artifact,
    sha256_file,
    write_manifest,
)
from vidrt.package.recipes import LoraRef
from vidrt.package.registry import ModelSpec, to_dict

TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".export.lock"
STAGING_PREFIX = ".export-staging-"


@dataclass(frozen=True)
class StageResult:
    """What one stage leaves in the package: its components (tokenizer: an artifact only)."""

    components: dict[str, Component]
    tokenizer: Artifact | None = None
    seconds: float = 0.0
    skipped: bool = False


@dataclass(frozen=True)
class Stage:
    name: str  # also the checkpoint component whose files it reads
    component_names: tuple[str, ...]  # package components it produces ("tokenizer" produces none)
    precision: str  # what this stage writes (T5 and VAE ignore an fp16 request): part of its fingerprint
    run: Callable[[], StageResult]
    source: str = ""  # the checkpoint component it reads, when not `name` (the encoder reads "vae")


def export_package(model_dir: Path | str, out: Path | str | None = None, variant: str | None = None, opset: int = 18,
                   precision: str = "fp32", progress: bool = True, *, fp8_scope: str = DEFAULT_FP8_SCOPE,
                   calibration_prompts: tuple[str, ...] | None = None, loras: Sequence[LoraRef] = ()) -> Path:
    """Export the checkpoint at `model_dir` into the package folder `out` (default engines/<variant>).
    loras: baked into the DiT weights (`vidrt export --lora`); the checkpoint's recipes.json (if any) and
    its LoRA files go into the package.
    precision "fp8": an fp32 package first, then every DiT expert replaced by its FP8 Q/DQ graph,
    calibrated on the package's own denoising steps (export/quantize_fp8.py `quantize_package`)."""
    if precision == "fp8":
        path = export_package(model_dir, out, variant, opset, "fp32", progress, loras=loras)
        from vidrt.export.quantize_fp8 import CALIBRATION_PROMPTS, quantize_package

        ckpt = open_checkpoint(model_dir, variant)
        with _locked(path):
            report = quantize_package(path, ckpt, scope=fp8_scope, prompts=calibration_prompts or CALIBRATION_PROMPTS,
                                      log=print if progress else (lambda s: None))
            # the experts' fingerprints say fp8, so a later fp32 export re-exports them instead of reusing
            manifest = load_manifest(path, verify=False)
            inputs = dict(manifest.export_inputs)
            for expert in report["experts"]:
                inputs[expert] = hashlib.sha256(f"{inputs.get(expert, '')}|fp8|{fp8_scope}".encode()).hexdigest()
            write_manifest(path, dataclasses.replace(manifest, export_inputs=inputs))
            _recut_pieces(path, print if progress else (lambda s: None))
        return path
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not supported: choose one of {', '.join(PRECISIONS)}, fp8")
    check_opset(opset)
    ckpt = open_checkpoint(model_dir, variant)
    ckpt.check_weights()  # every weight, before any file is written
    check_loras(ckpt, loras)  # a missing, damaged or mismatched LoRA too (keys, shapes), not after the encoders
    out = Path(out) if out is not None else Path("engines") / ckpt.spec.name
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the package")
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if the export fails
    had_lock = (out / LOCK_FILE).exists()
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only mount, a folder of someone else's, a path through a file
            raise cannot_write_in(f"--out {out}", exc) from None
        with _locked(out, f"--out {out}"):
            try:
                _export_locked(ckpt, out, opset, precision, progress, loras, Path(model_dir))
            except BaseException:
                if not had_lock:  # the folder as it was: without the lock file this export added
                    (out / LOCK_FILE).unlink(missing_ok=True)
                raise
    except BaseException:
        for folder in created:  # deepest first; only folders this export made, now empty again
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return out


def _recut_pieces(path: Path, log: Callable[[str], None]) -> None:
    """After FP8 quantisation the step-caching pieces must come from the FP8 graphs; a graph that
    cannot be cut loses its pieces (then `--cache` methods that need them are refused), never wrong ones."""
    try:
        add_dit_pieces(path, locked=True)
    except PackageError as exc:
        m = load_manifest(path, verify=False)
        keep = {n: c for n, c in m.components.items() if n.partition(".")[0] not in m.model.experts}
        write_manifest(path, dataclasses.replace(m, components=keep))
        log(f"no step-caching pieces for the FP8 DiT ({exc}); --cache easycache still works")


def _export_locked(ckpt: Checkpoint, out: Path, opset: int, precision: str, progress: bool,
                   loras: Sequence[LoraRef] = (), model_dir: Path | None = None) -> None:
    _remove_leftovers(out)
    previous = _previous_manifest(out)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        stages = _stages(ckpt, staging, opset, precision, loras)
        inputs = {s.name: _fingerprint(ckpt, s, opset, loras) for s in stages}
        results: dict[str, StageResult] = {}
        bar = tqdm(stages, desc="export", unit="stage", disable=not progress)
        for stage in bar:
            bar.set_description(f"export {stage.name}")
            reused = _reuse(previous, stage, inputs[stage.name], out)
            results[stage.name] = reused if reused is not None else _timed(stage.run)
            bar.set_postfix_str("skipped" if reused else f"{results[stage.name].seconds:.1f} s")
        bar.close()
        for name in sorted(p.name for p in staging.iterdir()):  # every stage succeeded: into place
            os.replace(staging / name, out / name)
        for r in results.values():  # a CPU form an earlier export wrote and this one did not: unlisted, remove
            for name, comp in ({} if r.skipped else r.components).items():
                for feature in CPU_FEATURES:
                    if feature not in comp.cpu_artifacts:
                        (out / _cpu_file(name, feature)).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tokenizer = results["tokenizer"].tokenizer
    assert tokenizer is not None
    components = {name: comp for r in results.values() for name, comp in r.components.items()}
    recipes, lora_files = package_recipes(model_dir, out) if model_dir is not None else ((), ())
    write_manifest(out, Manifest(schema_version=SCHEMA_VERSION, model=replace(ckpt.spec, recipes=recipes),
                                 tokenizer=tokenizer, loras=lora_files, components=components,
                                 baked_loras=baked_records(loras, ckpt.spec.experts), vidrt_version=vidrt.__version__,
                                 export_inputs=inputs,
                                 vocabulary=closed_vocabulary((out / TOKENIZER_FILE).read_text("utf-8"))))


def export_main(model: str, variant: str | None, out: str | None, opset: int, precision: str,
                fp8_scope: str = DEFAULT_FP8_SCOPE, calibration_prompts: tuple[str, ...] | None = None,
                loras: Sequence[LoraRef] = ()) -> Path:
    """Glue for the `vidrt export` click command: export, then print where the package is."""
    path = export_package(model, out, variant, opset, precision, progress=True, fp8_scope=fp8_scope,
                          calibration_prompts=calibration_prompts, loras=loras)
    print(f"exported {path}")
    return path


# ---- stages -----------------------------------------------------------------------------------


VAE_OPSET = 18  # see _stages


def _stages(ckpt: Checkpoint, out: Path, opset: int, precision: str, loras: Sequence[LoraRef] = ()) -> list[Stage]:
    spec = ckpt.spec

    def tokenizer() -> StageResult:
        _atomic_write_text(out / TOKENIZER_FILE, ckpt.tokenizer_json())
        return StageResult({}, tokenizer=make_artifact(out, TOKENIZER_FILE))

    te_precision = text_encoder_precision(precision)

    def text_encoder() -> StageResult:
        # traced on meta, weights streamed in when saved (umT5-XXL: 23 GB in fp32)
        contract = export_text_encoder(ckpt.text_encoder_on_meta(), out / f"{TEXT_ENCODER}.onnx", spec, opset,
                                       te_precision, state_dict=ckpt.text_encoder_readers())
        return StageResult({TEXT_ENCODER: _component(out, TEXT_ENCODER, contract, te_precision, opset)})

    def dit(expert: str) -> Callable[[], StageResult]:
        def run() -> StageResult:
            # meta-device trace + readers of the stored tensors: each is read, cast to the traced
            # dtype and written when the graph is saved (RAM: about one tensor, not the model)
            # always with external data: LoRAs replace initializers by name at load time (ONNX Runtime
            # add_external_initializers takes only external ones; fast_paths.md A.8), from the layout
            # recorded in the manifest (`weights`)
            contract = export_dit(None, out / f"{expert}.onnx", spec, opset, precision,
                                  state_dict=ckpt.transformer_readers(expert),
                                  config=ckpt.transformer_config(expert), external_data=True)
            comp = _component(out, expert, contract, precision, opset)
            comp = replace(comp, weights=weight_refs(out / f"{expert}.onnx"))
            comp = bake_loras(out, {expert: comp}, expert, loras).get(expert, comp)
            return StageResult({expert: comp, **dit_pieces(out, spec, comp, tolerant=True)})
        return run

    # The VAE graphs stay at opset 18 whatever --opset says: at 23 the exporter turns the mid-block
    # attention into one ONNX Attention op that TensorRT maps to IAttention with a single 384/1024-wide
    # head, a shape its fused kernels may not cover; at 18 it is MatMul/Softmax (plain GEMMs).
    vae_opset = min(opset, VAE_OPSET)

    # The VAE step graphs' AVX-512 form, where the model has one (its 8-channel convs as frame pairs:
    # onnx_optimize; the bundled model's decode 63.4 -> 49.3 ms per clip on an AVX-512 CPU)
    def vae() -> StageResult:
        first, step = export_vae_decoder(ckpt.vae(), out / f"{VAE_FIRST}.onnx", out / f"{VAE_STEP}.onnx", spec,
                                         vae_opset, step_avx512_path=out / _avx512_file(VAE_STEP))
        return StageResult({VAE_FIRST: _component(out, VAE_FIRST, first, "fp32", vae_opset),
                            VAE_STEP: _component(out, VAE_STEP, step, "fp32", vae_opset)})

    def vae_encoder() -> StageResult:  # the same mid-block attention as the decoder: the same opset rule
        first, step = export_vae_encoder(ckpt.vae(), out / f"{VAE_ENCODE_FIRST}.onnx", out / f"{VAE_ENCODE_STEP}.onnx",
                                         spec, vae_opset, step_avx512_path=out / _avx512_file(VAE_ENCODE_STEP))
        return StageResult({VAE_ENCODE_FIRST: _component(out, VAE_ENCODE_FIRST, first, "fp32", vae_opset),
                            VAE_ENCODE_STEP: _component(out, VAE_ENCODE_STEP, step, "fp32", vae_opset)})

    def image_encoder() -> StageResult:
        contract = export_image_encoder(ckpt.image_encoder(), out / f"{IMAGE_ENCODER}.onnx", spec, opset)
        return StageResult({IMAGE_ENCODER: _component(out, IMAGE_ENCODER, contract, "fp32", opset)})

    encoder = [Stage("vae_encoder", (VAE_ENCODE_FIRST, VAE_ENCODE_STEP), "fp32", vae_encoder, source="vae")] \
        if spec.image is not None else []  # image-to-video models only
    if spec.image is not None and spec.image.clip_size:  # Wan2.1 I2V/FLF2V: the CLIP vision tower
        encoder.append(Stage("image_encoder", (IMAGE_ENCODER,), "fp32", image_encoder))
    return [Stage("tokenizer", (), "-", tokenizer), Stage("text_encoder", (TEXT_ENCODER,), te_precision, text_encoder),
            *(Stage(e, (e, *(dit_piece(e, p) for p in DIT_PIECES)), precision, dit(e)) for e in spec.experts),
            Stage("vae", (VAE_FIRST, VAE_STEP), "fp32", vae), *encoder]


def dit_pieces(out: Path, spec: ModelSpec, whole: Component, tolerant: bool = False) -> dict[str, Component]:
    """The step-caching pieces of one exported DiT expert (vidrt.export.dit_split), as components
    that share the whole graph's external-data file. tolerant: a graph that cannot be cut (e.g. one
    with image-conditioning inputs the cut does not know yet) gets no pieces instead of an error."""
    try:
        pieces = split_dit(out / whole.artifact.file, spec, whole.contract, whole.name)
    except PackageError:
        if not tolerant:
            raise
        return {}
    return {name: Component(name=name, artifact=make_artifact(out, file.name, whole.artifact.data_file),
                            contract=contract, precision=whole.precision, opset=whole.opset,
                            weights=_piece_weights(file, whole))
            for name, (file, contract) in pieces.items()}


def _piece_weights(piece: Path, whole: Component) -> dict[str, WeightRef]:
    """The whole graph's weight records of the initializers this piece holds (the pieces keep the
    whole graph's names, offsets and layouts): a LoRA merge gives each piece only its own tensors,
    as ONNX Runtime refuses an external initializer the graph does not have."""
    import onnx

    held = {t.name for t in onnx.load(str(piece), load_external_data=False).graph.initializer}
    return {param: ref for param, ref in whole.weights.items() if ref.initializer in held}


def add_dit_pieces(package: Path | str, *, locked: bool = False) -> Path:
    """Cut the DiT(s) of an existing package into the step-caching pieces and record them in its
    manifest (packages exported before the pieces existed, the bundled model, FP8 graphs). Idempotent.
    locked: the caller already holds the package's export lock."""
    package = Path(package)
    with contextlib.nullcontext() if locked else _locked(package):
        m = load_manifest(package, verify=True)
        components = dict(m.components)
        for expert in m.model.experts:
            components.update(dit_pieces(package, m.model, components[expert]))
        write_manifest(package, dataclasses.replace(m, components=components))
    if not locked:
        (package / LOCK_FILE).unlink(missing_ok=True)
    return package


def _cpu_file(name: str, feature: str) -> str:
    """The file of component `name`'s form for CPUs with `feature` (manifest Component.cpu_artifacts)."""
    return f"{name}.{feature}.onnx"


def _avx512_file(name: str) -> str:
    return _cpu_file(name, "avx512f")


def _component(out: Path, name: str, contract: Contract, precision: str, opset: int) -> Component:
    """The component `name` as exported into `out`, with its AVX-512 form if the export wrote one."""
    file = f"{name}.onnx"
    cpu = {"avx512f": make_artifact(out, _avx512_file(name))} if (out / _avx512_file(name)).is_file() else {}
    return Component(name=name, artifact=make_artifact(out, file, data_file_name(out / file)), contract=contract,
                     precision=precision, opset=opset, cpu_artifacts=cpu)


def _timed(run: Callable[[], StageResult]) -> StageResult:
    t0 = time.perf_counter()
    try:
        result = run()
    except VidrtError:
        raise
    except Exception as exc:
        # A weight is read, checked and cast inside a lazy tensor while the graph is optimised or saved:
        # its PackageError arrives wrapped by onnx_ir / onnxscript (PassError, ...). Give it back as itself.
        inner = _vidrt_cause(exc)
        if inner is not None:
            raise inner from None
        raise
    gc.collect()  # drop the stage's torch modules/tensors before the next one loads
    return StageResult(result.components, result.tokenizer, time.perf_counter() - t0)


def _vidrt_cause(exc: BaseException) -> VidrtError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, VidrtError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# ---- skipping finished stages -----------------------------------------------------------------


def _fingerprint(ckpt: Checkpoint, stage: Stage, opset: int, loras: Sequence[LoraRef] = ()) -> str:
    """Everything a stage's output depends on: its source files, the export settings, the spec."""
    payload = {"stage": stage.name, "files": ckpt.fingerprint(stage.source or stage.name), "opset": opset,
               "layout": "external-data+weights" if stage.name in ckpt.spec.experts else "",
               "baked_loras": [[sha256_file(Path(r.path)), r.strength, r.expert] for r in loras
                               if stage.name in ckpt.spec.experts and r.expert in (None, stage.name)],
               "precision": stage.precision,
               "vidrt": vidrt.__version__, "spec": to_dict(ckpt.spec)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _previous_manifest(out: Path) -> Manifest | None:
    try:
        return load_manifest(out, verify=False)
    except PackageError:
        return None


def _reuse(previous: Manifest | None, stage: Stage, fingerprint: str, out: Path) -> StageResult | None:
    """The previous run's result for this stage if its inputs are unchanged and its files intact."""
    if previous is None or previous.export_inputs.get(stage.name) != fingerprint:
        return None
    if stage.name == "tokenizer":
        return StageResult({}, tokenizer=previous.tokenizer, skipped=True) \
            if _intact(out, previous.tokenizer) else None
    comps = {n: previous.components.get(n) for n in stage.component_names
             if "." not in n or n in previous.components}  # DiT pieces: absent where the graph was not cut
    if any(c is None or not all(_intact(out, a) for a in (c.artifact, *c.cpu_artifacts.values()))
           for c in comps.values()):
        return None
    return StageResult({n: c for n, c in comps.items() if c is not None}, skipped=True)


def _intact(out: Path, art: Artifact) -> bool:
    for name, digest, size in art.files():
        p = out / name
        if not p.is_file() or p.stat().st_size != size or sha256_file(p) != digest:
            return False
    return True


# ---- files ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(out: Path, what: str | None = None) -> Iterator[None]:
    """One export per package folder at a time (a second one waits, then skips what is done).
    OutputError (exit 5) where the lock file cannot be created (a read-only mount); `what` names `out` as
    the caller gave it (`--out DIR`; default: the package folder DIR)."""
    try:
        f = open(out / LOCK_FILE, "w")
    except OSError as exc:
        raise cannot_write_in(what or f"the package folder {out}", exc) from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(out: Path) -> None:
    """What a killed export leaves: temp folders `.<graph>.onnx.<random>/` and `*.tmp` files.
    No manifest ever names them."""
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(STAGING_PREFIX):  # a killed export's staging folder
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir() and p.name.startswith(".") and ".onnx." in p.name:
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# A word-level tokenizer this small is a closed vocabulary (the bundled tiny model): the manifest
# lists its words so `vidrt info` and the unknown-word warning can name them. umT5's 256k
# sentencepiece vocabulary is open and listed as nothing.
MAX_LISTED_WORDS = 1000


def closed_vocabulary(tokenizer_json: str) -> tuple[str, ...]:
    model = json.loads(tokenizer_json).get("model", {})
    vocab = model.get("vocab")
    if model.get("type") != "WordLevel" or not isinstance(vocab, dict) or len(vocab) > MAX_LISTED_WORDS:
        return ()
    return tuple(w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if not w.startswith("<"))


__all__ = ["export_package", "export_main", "add_dit_pieces", "dit_pieces", "TOKENIZER_FILE", "LOCK_FILE"]

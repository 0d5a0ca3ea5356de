"""FP8 (E4M3, per-tensor) post-training quantisation of a Wan DiT with NVIDIA ModelOpt, for TensorRT.

The recipe (reference/tensorrt_anchors.md §1.6, §2, §7.3):
  * weights and GEMM inputs of the transformer blocks' Linear layers, E4M3 per tensor, `max`
    calibration over real denoising trajectories (cond and uncond, every step, each A14B expert
    separately);
  * scope "ffn" (the qualified first step: feed-forward matrices only) or "linear" (also the
    self/cross-attention projections);
  * kept high precision: the patch embedding, the time/text embedders (`condition_embedder`), the
    output head (`proj_out`, `norm_out`, `scale_shift_table`), and the first and last
    `keep_blocks` blocks (ModelOpt's Wan filter: blocks 0-2 and 37-39 of 40);
  * attention itself (BMM/softmax) stays bf16: FP8 MHA only after quality checks.

`vidrt export CHECKPOINT --precision fp8` (export/package.py -> `quantize_package`):
  1. the package is exported at fp32 (every component), then run by vidrt's own pipeline (ONNX
     Runtime) over calibration prompts: every DiT call of every denoising step (cond + uncond in one
     batch) is recorded, per expert;
  2. the checkpoint's DiT is quantised (`quantize_dit`, ModelOpt `max` calibration on those inputs);
  3. it is exported with the TorchScript exporter at opset 19 -- ModelOpt's fake-quant ops have
     TorchScript symbolics only (the dynamo exporter fails on them: "No ONNX function found for
     tensorrt.quantize_op"), the route NVIDIA's Model-Optimizer diffusers example takes too -- and
     ModelOpt's `trt::TRT_FP8QuantizeLinear/DequantizeLinear` become standard ONNX
     QuantizeLinear/DequantizeLinear with a FLOAT8E4M3FN zero point (opset 19: float8 types), which
     both TensorRT's ONNX parser and ONNX Runtime's CPU provider run;
  4. the expert's ONNX in the package is replaced, the manifest says precision "fp8".
The Q/DQ graph keeps the unquantised parts in fp32 (TensorRT, strongly typed, runs them fp32; a
bf16 pass with ModelOpt AutoCast is the next step). Calibrating a 14B expert on ONNX Runtime CPU is
impractically slow: do it on a large GPU machine (`--onnx-export-only` style), build on the target.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vidrt.backends.residency import DEFAULT_FP8_SCOPE

E4M3 = {"num_bits": (4, 3), "axis": None}
HIGH_PRECISION_PARTS = ("patch_embedding", "condition_embedder", "text_embedding", "time_embedding",
                        "time_projection", "proj_out", "norm_out", "head", "scale_shift_table")
FFN_PATTERNS = ("*blocks.*.ffn.*",)  # diffusers ffn.net.0.proj / ffn.net.2; official ffn.0 / ffn.2
ATTENTION_PATTERNS = ("*blocks.*.attn1.*", "*blocks.*.attn2.*", "*blocks.*.self_attn.*", "*blocks.*.cross_attn.*")
SCOPES = ("ffn", "linear")


def kept_blocks(num_layers: int, keep_blocks: int = 3) -> list[int]:
    k = min(keep_blocks, num_layers)
    return sorted(set(range(k)) | set(range(num_layers - k, num_layers)))


def fp8_config(num_layers: int, scope: str = DEFAULT_FP8_SCOPE, keep_blocks: int = 3) -> dict[str, Any]:
    """ModelOpt quantisation config (the list form of ModelOpt >= 0.4x): everything off, then the
    chosen Linear layers of the blocks on, then the kept blocks and parts off again."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: use one of {SCOPES}")
    patterns = FFN_PATTERNS + (ATTENTION_PATTERNS if scope == "linear" else ())
    cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for p in patterns:
        cfg.append({"quantizer_name": p + "weight_quantizer", "cfg": dict(E4M3)})
        cfg.append({"quantizer_name": p + "input_quantizer", "cfg": dict(E4M3)})
    for i in kept_blocks(num_layers, keep_blocks):
        cfg.append({"quantizer_name": f"*blocks.{i}.*", "enable": False})
    for part in HIGH_PRECISION_PARTS:
        cfg.append({"quantizer_name": f"*{part}*", "enable": False})
    return {"quant_cfg": cfg, "algorithm": "max"}


def high_precision_filter(num_layers: int, keep_blocks: int = 3) -> Callable[[str], bool]:
    """Module-name predicate: True for what must stay high precision (for `mtq.disable_quantizer`)."""
    blocks = "|".join(str(i) for i in kept_blocks(num_layers, keep_blocks))
    rx = re.compile(rf"({'|'.join(HIGH_PRECISION_PARTS)})|blocks\.({blocks})\.")
    return lambda name: rx.search(name) is not None


def quantize_dit(model: Any, calibration: Iterable[dict[str, Any]], *, num_layers: int,
                 scope: str = DEFAULT_FP8_SCOPE,
                 keep_blocks: int = 3) -> Any:
    """Quantise `model` (a WanTransformer3DModel or an export wrapper with the same module names) in
    place with ModelOpt and return it. `calibration` yields keyword batches of real DiT inputs
    (hidden_states, timestep, encoder_hidden_states) recorded along denoising trajectories."""
    import modelopt.torch.quantization as mtq
    import torch

    batches = list(calibration)
    if not batches:
        raise ValueError("FP8 calibration needs at least one batch of real DiT inputs")

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for batch in batches:
                m(**batch)

    mtq.quantize(model, copy.deepcopy(fp8_config(num_layers, scope, keep_blocks)), forward_loop)
    mtq.disable_quantizer(model, high_precision_filter(num_layers, keep_blocks))
    return model


def quantized_layers(model: Any) -> list[str]:
    """Names of the modules whose weight quantizer is enabled (for reports and tests)."""
    out = []
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if q is not None and getattr(q, "is_enabled", False):
            out.append(name)
    return out


def record_calibration(model: Any) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """Hook `model.forward` to record its keyword inputs while a reference pipeline denoises
    (e.g. diffusers' WanPipeline with the same prompts and steps vidrt uses). Returns the list that
    fills up and a function that removes the hook."""
    import torch

    store: list[dict[str, Any]] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        names = ("hidden_states", "timestep", "encoder_hidden_states")
        batch = {n: v for n, v in zip(names, args, strict=False)} | {n: kwargs[n] for n in names if n in kwargs}
        store.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return store, handle.remove


# ---- FP8 package export (vidrt export --precision fp8) ----------------------------------------------

FP8_REPORT = "fp8_report.json"  # what quantize_package did, per expert (read by `vidrt plan`)
FP8_OPSET = 19  # float8 types exist from opset 19; ModelOpt's TorchScript symbolics target it
CALIBRATION_SEED = 7
CALIBRATION_PROMPTS = ("a cat walking on a sunny beach", "a red car driving through a city at night",
                       "waves crashing on rocks, slow motion", "a person dancing in a colourful room")


def record_dit_inputs(pipe: Any, prompts: Sequence[str], seed: int = CALIBRATION_SEED,
                      steps: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run vidrt's pipeline (`vidrt.pipeline.Pipeline`) on `prompts` and record the feeds of every DiT
    call, per expert, as keyword batches for the torch DiT (hidden_states, timestep,
    encoder_hidden_states): the real denoising trajectories of this package."""
    import numpy as np
    import torch
    from vidrt.request import Request

    batches: dict[str, list[dict[str, Any]]] = {e: [] for e in pipe.manifest.model.experts}
    originals = {}
    for expert in batches:
        engine = pipe.engine(expert)
        originals[expert] = engine.run

        def recording(feeds: dict[str, Any], _run: Any = engine.run, _to: list[dict[str, Any]] = batches[expert]
                      ) -> Any:
            _to.append({k: torch.from_numpy(np.array(v)) for k, v in feeds.items()} | {"return_dict": False})
            return _run(feeds)

        engine.run = recording
    try:
        for prompt in prompts:
            pipe.run(Request(prompt=prompt, seed=seed, steps=steps))
    finally:
        for expert, run in originals.items():
            pipe.engine(expert).run = run
    return batches


def _rms_norm_symbolic(g: Any, x: Any, shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm for the TorchScript exporter (it has none): x / sqrt(mean(x^2) + eps) * w."""
    import torch
    from torch.onnx import symbolic_helper as sh

    n = len(sh._get_const(shape, "is", "normalized_shape"))
    e = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
    axes = g.op("Constant", value_t=torch.tensor(list(range(-n, 0)), dtype=torch.int64))
    mean_sq = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    eps_t = g.op("Constant", value_t=torch.tensor(1e-6 if e is None else float(e)))
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_sq, eps_t)))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def standard_qdq(model: Any) -> int:
    """ModelOpt's trt::TRT_FP8{Quantize,Dequantize}Linear -> ONNX (Quantize|Dequantize)Linear with a
    FLOAT8E4M3FN zero point (ONNX opset 19 spec: the zero point's type is the quantised type).
    Returns how many Q/DQ pairs were rewritten."""
    import onnx

    zero = "fp8_e4m3fn_zero_point"
    model.graph.initializer.append(onnx.helper.make_tensor(zero, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
    pairs = 0
    for node in model.graph.node:
        if node.op_type == "TRT_FP8QuantizeLinear":
            node.op_type, node.domain = "QuantizeLinear", ""
            node.input.append(zero)
            pairs += 1
        elif node.op_type == "TRT_FP8DequantizeLinear":
            node.op_type, node.domain = "DequantizeLinear", ""
    del model.graph.value_info[:]  # the exporter typed the quantised tensors uint8
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return pairs


def export_fp8_dit(model: Any, spec: Any, path: Path) -> dict[str, Any]:
    """A quantised DiT -> ONNX with FP8 Q/DQ (TorchScript exporter, opset 19), the contract's I/O
    names and dynamic axes. Returns {"qdq_pairs", "opset", "size_bytes"}."""
    import onnx
    import torch
    from vidrt.export.components import dit_graph_spec, stack_rope
    from vidrt.package import contracts as C

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, FP8_OPSET)
    video = {0: "batch", 2: "frames", 3: "height", 4: "width"}
    timestep = {0: "batch", 1: "tokens"} if spec.per_token_timestep else {0: "batch"}
    tmp = path.with_name(path.name + ".tmp")
    with stack_rope(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = dit_graph_spec(model, spec, "fp32")
        torch.onnx.export(g.module, g.args, str(tmp), dynamo=False, opset_version=FP8_OPSET,
                          input_names=[C.LATENTS, C.TIMESTEP, C.CONTEXT], output_names=[C.VELOCITY],
                          dynamic_axes={C.LATENTS: video, C.TIMESTEP: timestep, C.CONTEXT: {0: "batch"},
                                        C.VELOCITY: video})
    m = onnx.load(str(tmp))
    pairs = standard_qdq(m)
    onnx.checker.check_model(m)
    if pairs == 0:
        tmp.unlink()
        raise ValueError("no Linear layer was quantised (every block kept high precision?); lower keep_blocks")
    # What a TensorRT engine of this graph holds: each quantised weight folded to 1 byte (FP8), every
    # other float initializer as is (fp32). `vidrt plan` reads it from the package's FP8_REPORT.
    quantised = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    engine_bytes = 0
    for t in m.graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        engine_bytes += n * (1 if t.name in quantised else itemsize)
    onnx.save(m, str(tmp))
    tmp.replace(path)
    return {"qdq_pairs": pairs, "opset": FP8_OPSET, "size_bytes": path.stat().st_size,
            "engine_weight_bytes": engine_bytes}


def quantize_package(package: Path, checkpoint: Any, *, scope: str = DEFAULT_FP8_SCOPE, keep_blocks: int | None = None,
                     prompts: Sequence[str] = CALIBRATION_PROMPTS, steps: int | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Replace every DiT expert of the fp32 `package` (exported from `checkpoint`, an
    export.checkpoints.Checkpoint) by its FP8 Q/DQ graph, calibrated on the package's own denoising
    trajectories. keep_blocks None: ModelOpt's Wan default (3) where the DiT has more than 6 blocks,
    else 0 (a tiny DiT would keep every block). Rewrites manifest.json. Returns a report."""
    from vidrt.package.manifest import load_manifest, make_artifact, write_manifest
    from vidrt.pipeline import Pipeline

    pipe = Pipeline.load(package, backend="onnxruntime", warn=lambda msg: None)
    batches = record_dit_inputs(pipe, prompts, CALIBRATION_SEED, steps)
    del pipe
    manifest = load_manifest(package, verify=False)
    report: dict[str, Any] = {"scope": scope, "prompts": list(prompts), "experts": {}}
    components = dict(manifest.components)
    for expert, calib in batches.items():
        model = checkpoint.transformer(expert).eval()
        layers = int(model.config.num_layers)
        keep = keep_blocks if keep_blocks is not None else (3 if layers > 6 else 0)
        log(f"fp8: calibrating {expert} on {len(calib)} DiT calls ({scope}, keeping {keep} blocks at each end)")
        quantize_dit(model, calib, num_layers=layers, scope=scope, keep_blocks=keep)
        comp = components[expert]
        info = export_fp8_dit(model, manifest.model, package / comp.artifact.file)
        data = package / (comp.artifact.data_file or "")
        if comp.artifact.data_file and data.is_file():
            data.unlink()  # the fp8 graph keeps its (fp32 + scales) weights inside the .onnx
        # The fp8 graph holds its weights inline (no weight records: LoRAs need the fp32 package), and the
        # step-caching pieces cut from the fp32 graph shared the data file just removed: they go too.
        components[expert] = dataclasses.replace(comp, artifact=make_artifact(package, comp.artifact.file),
                                                 precision="fp8", opset=FP8_OPSET, weights={})
        for piece in [n for n in components if n.startswith(f"{expert}.")]:
            (package / components[piece].artifact.file).unlink(missing_ok=True)
            del components[piece]
        report["experts"][expert] = info | {"calibration_calls": len(calib), "keep_blocks": keep,
                                            "quantized_layers": len(quantized_layers(model))}
    write_manifest(package, dataclasses.replace(manifest, components=components))
    (package / FP8_REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


__all__ = ["fp8_config", "kept_blocks", "high_precision_filter", "quantize_dit", "quantized_layers",
           "record_calibration", "SCOPES", "record_dit_inputs", "standard_qdq", "export_fp8_dit", "quantize_package",
           "FP8_OPSET", "CALIBRATION_PROMPTS", "CALIBRATION_SEED"]

"""Export the three Wan components to ONNX (dynamo exporter), atomically, and return their contracts.

Every writer goes to a temporary folder beside the target and renames into place, the external
data file first, so a killed export never leaves a `.onnx` that points at a half-written
`.onnx.data`. Large graphs (the 5B/14B DiT) are traced on the meta device and get their weights
attached afterwards (reference/feasibility.md §2.2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn
from vidrt.errors import PackageError, UsageError
from vidrt.export.components import (
    PRECISIONS,
    TORCH_DTYPES,
    GraphSpec,
    dit_graph_spec,
    eager_attention,
    image_encoder_graph_spec,
    make_low_precision,
    nearest_upsampling,
    stack_rope,
    text_encoder_graph_spec,
    vae_encoder_graph_specs,
    vae_graph_specs,
)
from vidrt.export.onnx_optimize import conv3d_as_conv2d, narrow_frame_pair_convs, optimize_model
from vidrt.package.contracts import Contract
from vidrt.package.manifest import WeightRef
from vidrt.package.registry import ModelSpec

# torch.onnx's op registry warns once per torchvision op ("torchvision is not installed. Skipping
# torchvision::nms", six lines on every `vidrt export`): vidrt exports no torchvision op, so they are noise.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

# Above this many bytes of weights the graph is saved with external data (protobuf caps a file at
# 2 GiB; torch itself switches at 1.5 GiB, so stay at its threshold to keep the two in agreement).
EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024
Weight = torch.Tensor | Callable[[], torch.Tensor]  # a tensor, or a reader that loads it (streamed export)
MIN_OPSET, MAX_OPSET = 18, 23  # the dynamo exporter has nothing below 18


def data_file_name(path: Path) -> str:
    """The external-data file name the exporter records inside `path`."""
    return path.name + ".data"


# ---- the one export routine -------------------------------------------------------------------


def export_graph(graph: GraphSpec, path: Path | str, opset: int = 18, *,
                 weights: Mapping[str, Weight] | None = None, include_weights: bool = True,
                 external_data: bool | None = None, conv2d: bool = False,
                 avx512_path: Path | str | None = None) -> Contract:
    """Trace `graph.module` with torch.onnx (dynamo) and write it to `path` atomically.

    weights: for a module on the meta device, the real tensors by initializer name ("model.<key>");
    they are attached after tracing, then the graph is optimised. include_weights=False writes the
    graph alone (no initializers): for inspecting full-size graphs without their weights.
    external_data: None = only when the weights exceed EXTERNAL_DATA_BYTES.
    conv2d: rewrite the time-stride-1 Conv3ds as Conv2ds over the frames (onnx_optimize.conv3d_as_conv2d;
    needs the weights' values, so a graph traced on the meta device without `weights` keeps its Conv3ds).
    avx512_path (with conv2d): also write the graph with its narrow convs as frame pairs, the form for CPUs
    with AVX-512 (onnx_optimize's frame-pairs notes), there, where it has convs narrower than 16 channels
    on both sides and its weights stay inline; otherwise none is written (and a file already there removed)."""
    check_opset(opset)
    path = Path(path)
    on_meta = any(p.is_meta for p in graph.module.parameters())
    if on_meta and include_weights and weights is None:
        raise UsageError("a graph traced on the meta device needs `weights` (or include_weights=False)")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (TracerWarnings, deprecations)
        prog = torch.onnx.export(
            graph.module, graph.args, None, dynamo=True, opset_version=opset, verbose=False,
            input_names=list(graph.contract.input_names), output_names=list(graph.contract.output_names),
            dynamic_shapes=graph.dynamic_shapes, optimize=False, external_data=False)
    assert prog is not None
    _drop_stack_traces(prog.model)
    if weights is not None:
        _apply_weights(prog, weights)
    pairs_model = None
    if weights is not None or not on_meta:  # after the weights: constant folding needs their values
        # a graph asked for with external data (the DiT) takes LoRAs by initializer name: one per parameter
        optimize_model(prog.model, dedupe_initializers=not external_data)
        if conv2d:
            if avx512_path is not None and include_weights and narrow_frame_pair_convs(prog.model):
                pairs_model = ir.from_proto(ir.to_proto(prog.model))  # a copy, rewritten the other way
                conv3d_as_conv2d(pairs_model, frame_pairs=True)
            conv3d_as_conv2d(prog.model)
    _name_dims(prog.model, graph.contract)
    if external_data is None:
        external_data = include_weights and _initializer_bytes(prog) > EXTERNAL_DATA_BYTES
    if avx512_path is not None:
        avx512_path = Path(avx512_path)
        if pairs_model is not None and not external_data:
            _name_dims(pairs_model, graph.contract)
            with _atomic_target(avx512_path) as tmp_path:
                ir.save(pairs_model, tmp_path)
        else:
            avx512_path.unlink(missing_ok=True)  # a stale one from an earlier export
    with _atomic_target(path) as tmp_path:
        if external_data and include_weights:
            # every initializer in the data file, small ones too (onnx_ir keeps < 256 bytes inline by
            # default): LoRAs replace initializers by name and ONNX Runtime can only replace external ones
            ir.save(prog.model, tmp_path, external_data=data_file_name(path), size_threshold_bytes=0)
            _inline_constants(tmp_path)  # but not the graph's own constants: ORT shape inference reads them
        else:
            prog.save(tmp_path, include_initializers=include_weights, external_data=external_data)
    return graph.contract


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(model: ir.Model) -> None:
    """torch.onnx records each node's Python stack trace in its metadata: the absolute paths of the exporting
    machine's files (a third of the bundled VAE step graph's bytes). Dropped, so a package names no folder
    and two exports of one checkpoint are byte-identical wherever they ran (vidrt batch keys its resume on
    the package's identity). The graph's record of the torch program's symbol ranges goes too: a set printed
    in hash order, it differed between two exports of the same checkpoint. The other metadata (the FX node,
    module names, the program's signature) stays: it names no file."""
    model.graph.metadata_props.pop("pkg.torch.export.ExportedProgram.range_constraints", None)
    for graph in [model.graph, *model.functions.values()]:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE_KEY, None)


def _inline_constants(path: Path, prefix: str = "model.", max_bytes: int = 256) -> None:
    """Move the small initializers that are not model parameters (split sizes, shape constants, scalars
    the exporter made) back into the graph file; the parameters stay in the data file."""
    m = onnx.load(str(path), load_external_data=False)
    with open(path.parent / data_file_name(path), "rb") as data:  # read per tensor: a 14B DiT is 28 GB
        for init in m.graph.initializer:
            info = {e.key: e.value for e in init.external_data}
            if init.name.startswith(prefix) or init.data_location != onnx.TensorProto.EXTERNAL \
                    or int(info["length"]) > max_bytes:
                continue
            data.seek(int(info.get("offset", 0)))
            init.raw_data = data.read(int(info["length"]))
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    onnx.save_model(m, str(path))


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"opset {opset} is not supported: choose {MIN_OPSET} (ONNX Runtime) to {MAX_OPSET} "
                         f"(fused Attention/RMSNormalization for TensorRT)")


def _apply_weights(prog: Any, weights: Mapping[str, Weight]) -> None:
    """Attach real tensors to the traced initializers, cast to the dtype the graph was traced with.
    Readers become onnx_ir LazyTensors: read, cast and written one at a time when the graph is saved,
    so peak RAM is about one tensor, not the model plus its cast copy (57 GB for a 14B DiT)."""
    inits = prog.model.graph.initializers
    missing = [name for name in inits if name not in weights and inits[name].const_value is None]
    if missing:
        raise UsageError(f"no weights for {len(missing)} graph initializer(s), e.g. {missing[:3]}")
    cast = {}
    for name, tensor in weights.items():
        if name not in inits:
            continue
        want = _torch_dtype(inits[name].dtype)
        if callable(tensor):
            init = inits[name]
            shape = tuple(int(d) for d in init.shape)
            init.const_value = ir.LazyTensor(partial(_read_cast, tensor, want, shape, name), dtype=init.dtype,
                                             shape=ir.Shape(shape))
        else:
            cast[name] = tensor.to(want) if tensor.dtype != want else tensor
    prog.apply_weights(cast)
    _transpose_lazily(prog.model.graph)


def _transpose_lazily(graph: Any) -> None:
    """onnxscript's constant folder folds Transpose(weight) whatever the weight's size (a Linear is
    traced as MatMul(x, Transpose(W))), which would materialise every transposed weight in RAM. For a
    lazy weight read by nothing else, fold it here instead: the initializer transposes when read."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or not isinstance(src.const_value, ir.LazyTensor) \
                or len(src.uses()) != 1 or node.outputs[0].is_graph_output():
            continue
        lazy = src.const_value
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes \
            else tuple(reversed(range(len(lazy.shape))))
        shape = ir.Shape([lazy.shape[i] for i in perm])
        src.const_value = ir.LazyTensor(partial(_transposed, lazy, perm), dtype=lazy.dtype, shape=shape)
        src.shape = shape
        node.outputs[0].replace_all_uses_with(src)
        graph.remove(node, safe=True)


def _transposed(lazy: Any, perm: tuple[int, ...]) -> ir.Tensor:
    return ir.Tensor(np.ascontiguousarray(lazy.numpy().transpose(perm)), dtype=lazy.dtype)


def _read_cast(read: Callable[[], torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...], name: str) -> ir.Tensor:
    t = read()
    if tuple(t.shape) != shape:
        raise PackageError(f"weight {name.removeprefix('model.')} has shape {tuple(t.shape)}, the model needs {shape}; "
                           f"the checkpoint's config does not match its weights")
    t = t.to(dtype).contiguous()
    if dtype == torch.bfloat16:  # numpy has no bfloat16: hand onnx_ir the raw bits
        return ir.Tensor(t.view(torch.uint16).numpy(), dtype=ir.DataType.BFLOAT16)
    return ir.Tensor(t.numpy())


def _torch_dtype(ir_dtype: Any) -> torch.dtype:
    table = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
             ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
             ir.DataType.BOOL: torch.bool}
    return table[ir_dtype]


def _initializer_bytes(prog: Any) -> int:
    return sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)


def _name_dims(model: Any, contract: Contract) -> None:
    """Give the graph's symbolic I/O dims the contract's names ('2*half_height' -> 'height')."""
    specs = {t.name: t for t in contract.inputs + contract.outputs}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        spec = specs.get(value.name)
        if spec is None or value.shape is None:
            continue
        pairs = zip(value.shape, spec.shape, strict=True)
        value.shape = ir.Shape([d if isinstance(want, int) else ir.SymbolicDim(want) for d, want in pairs])


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path with the final file name (the .onnx records its data file's name); on
    success move the data file, then the graph, into place and drop any stale data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_path = tmp_dir / path.name
        yield tmp_path
        data = tmp_dir / data_file_name(path)
        final_data = path.parent / data_file_name(path)
        if data.exists():
            os.replace(data, final_data)
        elif final_data.exists():
            final_data.unlink()
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---- per component ----------------------------------------------------------------------------


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not supported: choose one of {', '.join(PRECISIONS)}")


def text_encoder_precision(precision: str) -> str:
    """umT5 overflows in fp16: it is exported bf16 only when bf16 is asked for, else fp32."""
    return "bf16" if precision == "bf16" else "fp32"


def export_text_encoder(model: nn.Module, path: Path | str, spec: ModelSpec, opset: int = 18, precision: str = "fp32",
                        *, external_data: bool | None = None,
                        state_dict: Mapping[str, Weight] | None = None) -> Contract:
    """UMT5EncoderModel -> ONNX with dynamic [batch, seq] (eager attention; SDPA does not export).
    A model on the meta device takes its weights from `state_dict` (tensors or readers, any dtype),
    attached after tracing and streamed into the file: umT5-XXL is 23 GB in fp32."""
    _check_precision(precision)
    model = model.eval()
    if text_encoder_precision(precision) == "bf16":
        # cast all but the modules transformers keeps fp32 (UMT5: the FFN output `wo`)
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, p in model.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(torch.bfloat16)
    weights = None
    if model_on_meta(model):
        if state_dict is None:
            raise UsageError("a text encoder on the meta device needs its state_dict")
        weights = {"model." + k: v for k, v in state_dict.items()}
    with eager_attention(model):
        return export_graph(text_encoder_graph_spec(model, spec), path, opset, weights=weights,
                            external_data=external_data)


def build_meta_dit(config: Mapping[str, Any]) -> nn.Module:
    """WanTransformer3DModel with no storage: for tracing 5B/14B graphs on a small machine."""
    from diffusers import WanTransformer3DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return WanTransformer3DModel(**cfg).eval()


def dit_rope_buffers(config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The RoPE tables are non-persistent buffers (not in checkpoints): compute them on the CPU."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim = config.get("attention_head_dim", 128)
    rope = WanRotaryPosEmbed(head_dim, tuple(config.get("patch_size", (1, 2, 2))), config.get("rope_max_seq_len", 1024))
    return {"model.rope.freqs_cos": rope.freqs_cos, "model.rope.freqs_sin": rope.freqs_sin}


def export_dit(model: nn.Module | None, path: Path | str, spec: ModelSpec, opset: int = 18, precision: str = "fp32",
               state_dict: Mapping[str, Weight] | None = None, config: Mapping[str, Any] | None = None, *,
               include_weights: bool = True, external_data: bool | None = None,
               rewrite_rope: bool = True) -> Contract:
    """WanTransformer3DModel -> ONNX, dynamic batch/frames/height/width (TI2V: timestep [B, tokens]).

    Either pass a model (exported as is), or model=None with the diffusers `config` and
    `state_dict`: then the graph is traced on the meta device and the weights attached afterwards,
    so no second copy of a 14B model is ever materialised. With model=None, state_dict=None and
    include_weights=False only the graph is written. precision fp16/bf16 keeps DIT_FP32_PARTS fp32."""
    _check_precision(precision)
    if model is not None and state_dict is not None:
        raise UsageError("export_dit takes a model or (config, state_dict), not both")
    if model is None:
        if config is None:
            raise UsageError("export_dit needs a model, or its config (and state_dict) for a meta-device export")
        model = build_meta_dit(config)
    model = model.eval()
    handles = make_low_precision(model, TORCH_DTYPES[precision]) if precision != "fp32" else []
    weights = None
    if model_on_meta(model) and state_dict is not None:
        weights = {"model." + k: v for k, v in state_dict.items()}
        weights.update(dit_rope_buffers(config if config is not None else dict(model.config)))
    try:
        with stack_rope(model) if rewrite_rope else contextlib.nullcontext():
            return export_graph(dit_graph_spec(model, spec, precision), path, opset, weights=weights,
                                include_weights=include_weights, external_data=external_data)
    finally:
        for h in handles:
            h.remove()


def model_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def export_vae_decoder(vae: nn.Module, first_path: Path | str, step_path: Path | str, spec: ModelSpec,
                       opset: int = 18, *, include_weights: bool = True,
                       external_data: bool | None = None, conv2d: bool = True,
                       step_avx512_path: Path | str | None = None) -> tuple[Contract, Contract]:
    """AutoencoderKLWan decoder -> vae_decode_first + vae_decode_step (explicit 2-frame caches), fp32,
    dynamic lat_h/lat_w. Includes post_quant_conv, the [-1, 1] clamp and (Wan2.2) the unpatchify.
    conv2d: the causal Conv3ds as Conv2ds over the frames (onnx_optimize.conv3d_as_conv2d: ~2x faster
    VAE on ONNX Runtime's CPU provider); False keeps ONNX Conv3d (TensorRT runs both).
    step_avx512_path: where the step graph's AVX-512 form goes, if it has one (export_graph's avx512_path)."""
    vae = vae.eval()
    with nearest_upsampling(vae):
        first, step = vae_graph_specs(vae, spec)
        c_first = export_graph(first, first_path, opset, include_weights=include_weights, external_data=external_data,
                               conv2d=conv2d)
        c_step = export_graph(step, step_path, opset, include_weights=include_weights, external_data=external_data,
                              conv2d=conv2d, avx512_path=step_avx512_path)
    return c_first, c_step


def weight_refs(path: Path | str, prefix: str = "model.") -> dict[str, WeightRef]:
    """Parameter name -> where it is stored, for every external-data initializer named `prefix` + key
    (the exporter keeps torch's names, `model.<diffusers key>`). A 2-D weight read by MatMul as its second
    input is stored transposed ([in, out]: `_transpose_lazily` folded the Transpose into it); one read
    through Gemm/Conv keeps torch's layout. vidrt.lora merges LoRAs into exactly these (manifest `weights`)."""
    m = onnx.load(str(path), load_external_data=False)
    matmul_b = {n.input[1] for n in m.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    out = {}
    for init in m.graph.initializer:
        if not init.name.startswith(prefix) or init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        dtype = "bfloat16" if init.data_type == onnx.TensorProto.BFLOAT16 \
            else onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        out[init.name[len(prefix):]] = WeightRef(
            initializer=init.name, transposed=len(init.dims) == 2 and init.name in matmul_b,
            offset=int(info.get("offset", 0)), length=int(info["length"]), dtype=dtype, shape=tuple(init.dims))
    return out


def export_vae_encoder(vae: nn.Module, first_path: Path | str, step_path: Path | str, spec: ModelSpec,
                       opset: int = 18, *, include_weights: bool = True,
                       external_data: bool | None = None, conv2d: bool = True,
                       step_avx512_path: Path | str | None = None) -> tuple[Contract, Contract]:
    """AutoencoderKLWan encoder -> vae_encode_first + vae_encode_step (explicit 2-frame caches), fp32,
    dynamic lat_h/lat_w (i2v.md §3). Includes the Wan2.2 patchify and quant_conv; outputs mu.
    conv2d: the causal Conv3ds as Conv2ds over the frames (onnx_optimize.conv3d_as_conv2d: ~2x faster
    VAE on ONNX Runtime's CPU provider); False keeps ONNX Conv3d (TensorRT runs both).
    step_avx512_path: where the step graph's AVX-512 form goes, if it has one (export_graph's avx512_path)."""
    vae = vae.eval()
    first, step = vae_encoder_graph_specs(vae, spec)
    c_first = export_graph(first, first_path, opset, include_weights=include_weights, external_data=external_data,
                           conv2d=conv2d)
    c_step = export_graph(step, step_path, opset, include_weights=include_weights, external_data=external_data,
                          conv2d=conv2d, avx512_path=step_avx512_path)
    return c_first, c_step


def export_image_encoder(model: nn.Module, path: Path | str, spec: ModelSpec, opset: int = 18, *,
                         external_data: bool | None = None) -> Contract:
    """CLIPVisionModel -> image_encoder.onnx, fp32, dynamic image count (Wan2.1 I2V: 1, FLF2V: 2).
    Eager attention: SDPA's decomposition is what the UMT5 export also avoids."""
    model = model.eval()
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return export_graph(image_encoder_graph_spec(model, spec), path, opset, external_data=external_data)
    finally:
        model.set_attn_implementation(before)


def graph_io(path: Path | str) -> dict[str, tuple[str, tuple[int | str, ...]]]:
    """name -> (numpy dtype name, shape) of a saved graph's inputs and outputs, without its weights."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for v in list(m.graph.input) + list(m.graph.output):
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type != onnx.TensorProto.BFLOAT16 \
            else "bfloat16"
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        out[v.name] = (dtype, shape)
    return out


__all__ = ["EXTERNAL_DATA_BYTES", "export_graph", "export_text_encoder", "export_dit", "export_vae_decoder",
           "export_vae_encoder", "export_image_encoder",
           "build_meta_dit", "dit_rope_buffers", "text_encoder_precision", "graph_io", "weight_refs", "data_file_name",
           "check_opset"]

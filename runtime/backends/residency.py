"""The device-memory plan: what each stage needs, what stays resident, what is loaded per stage,
and the VAE tile, so that a card of a given size is never over-committed. Pure arithmetic.

Stages of one clip (runtime/pipeline.py): text (umT5, prompt + negative prompt) -> denoise (one
DiT, or the two A14B experts one after the other: the high-noise expert while t >= boundary) ->
decode (VAE first/step engines over fixed-shape tiles). A stage's peak is the sum of what is on
the device while it runs:

    reserve       CUDA context, cuBLAS/cuDNN/TensorRT handles (RESERVE_BYTES, measured-order value)
    weights       per engine: from the ONNX file at the engine precision when a package is given
                  (bytes scaled by the precision ratio of the formula below when the ONNX has another
                  precision), else params x bytes from the architecture (`dit_param_count`, ...)
    activations   TensorRT's own figure when a plan was built (report.json: device_memory_size_v2,
                  written by `vidrt build`), else the per-token estimate of `dit_activation_bytes`
    I/O buffers   the contract's tensors at the request's shapes x dtype sizes (what the TensorRT
                  backend preallocates)
    VAE tile      runtime/vae_decode.py's estimate for the chosen tile (`estimate_memory`)

Decisions, in order:
  1. Everything resident for the whole clip when it all fits (no reloads between clips).
  2. Otherwise per stage: the text encoder is released before denoising; the A14B experts swap once
     at the boundary (each expert alone on the device); the DiT is released before decoding.
  3. Denoising runs CFG as one batch-2 call when it fits, else as two batch-1 calls (half the
     activations).
  4. If a DiT still does not fit, it needs weight streaming (engine built with
     `--weight-streaming`): the part of its weights that does not fit is streamed from host memory
     on every call; the plan says how many bytes.
  5. The VAE tile is the cheapest tiling (`vae_decode.choose_tile`) whose tile fits what is left.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vidrt.errors import UsageError, arg
from vidrt.package import contracts as C
from vidrt.package.contracts import Contract, TensorSpec, resolve_shape
from vidrt.package.manifest import Manifest
from vidrt.package.registry import DiTConfig, ModelSpec, TextConfig
from vidrt.vae_decode import TilePlan, choose_tile, estimate_memory, plan_tiles

MiB, GiB = 2**20, 2**30
RESERVE_BYTES = 768 * MiB  # CUDA context (~300-500 MiB on Ada) + library handles + TensorRT runtime
DIT_WORKSPACE_BYTES = 1 * GiB  # tactic scratch beyond the activation estimate (no engine report)
STREAMING_SCRATCH_BYTES = 512 * MiB  # TensorRT's weight_streaming_scratch_memory_size, order of magnitude
PCIE_BYTES_PER_S = 25e9  # PCIe 4.0 x16, host -> device, realistic
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1,
               "float8_e4m3fn": 1}
FP8_KEEP_BLOCKS = 3  # first and last blocks kept high precision (ModelOpt's Wan filter: blocks 0-2, 37-39)
# The one default FP8 scope (quantize_fp8, `vidrt export/plan --fp8-scope`): the feed-forward matrices
# only, the qualified first step (reference/tensorrt_anchors.md §7.3); "linear" adds the attention ones.
DEFAULT_FP8_SCOPE = "ffn"

# ---- parameter counts from the architecture ---------------------------------------------------------


@dataclass(frozen=True)
class DiTParams:
    """Parameter groups of a Wan DiT (official WanModel == diffusers WanTransformer3DModel).

    Per block (d = dim, f = ffn_dim):
      self-attn q, k, v, o  4 (d² + d)       cross-attn q, k, v, o  4 (d² + d)
      q/k RMSNorm x2 attn   4 d              cross-attn LayerNorm   2 d
      modulation [1, 6, d]  6 d              FFN d->f->d            2 d f + f + d
      => 8 d² + 2 d f + 21 d + f
    Outside the blocks:
      patch embedding Conv3d  in·pt·ph·pw·d + d
      text embedder           text_dim·d + d + d² + d
      time embedder           freq_dim·d + d + d² + d
      time projection         6 d² + 6 d
      head                    d·out·pt·ph·pw + out·pt·ph·pw + 2 d (its modulation)
    Cross-check (measured on the meta device, reference/wan_official.md): 1.3B -> 1,418,996,800;
    14B -> 14,288,491,584; 5B -> 4,999,787,712 (tests/test_residency.py).
    """

    block_linear_weights: int  # per block: the 8 attention matrices (8 d²)
    block_ffn_weights: int  # per block: 2 d f
    block_other: int  # per block: biases, norms, modulation
    block_fp32: int  # per block, of block_other: norms + modulation (kept fp32 in low-precision graphs)
    num_layers: int
    outside: int  # embedders + head
    outside_fp32: int  # time embedder + time projection + head modulation (fp32 in low-precision graphs)

    @property
    def per_block(self) -> int:
        return self.block_linear_weights + self.block_ffn_weights + self.block_other

    @property
    def total(self) -> int:
        return self.num_layers * self.per_block + self.outside


def dit_params(cfg: DiTConfig) -> DiTParams:
    d, f = cfg.dim, cfg.ffn_dim
    p = math.prod(cfg.patch_size)
    linear = 8 * d * d
    ffn = 2 * d * f
    other = 8 * d + 4 * d + 2 * d + 6 * d + f + d  # 8 attention biases, q/k norms, cross norm, modulation, FFN biases
    fp32 = 4 * d + 2 * d + 6 * d
    patch = cfg.in_channels * p * d + d
    text = cfg.text_dim * d + d + d * d + d
    time = cfg.freq_dim * d + d + d * d + d
    proj = 6 * d * d + 6 * d
    head = d * cfg.out_channels * p + cfg.out_channels * p + 2 * d
    return DiTParams(linear, ffn, other, fp32, cfg.num_layers, patch + text + time + proj + head,
                     time + proj + 2 * d)


def dit_param_count(cfg: DiTConfig) -> int:
    return dit_params(cfg).total


def text_param_count(cfg: TextConfig) -> int:
    """umT5 encoder (inner attention dim = d_model, as in umT5-XXL: 64 heads x 64):
    per layer 4 d² (q, k, v, o; no biases) + 3 d d_ff (gated-GELU wi_0, wi_1, wo) + 2 d (RMSNorms)
    + buckets x heads (umT5: a relative-position bias per layer); plus vocab x d + d.
    umT5-XXL: 5,680,910,336 (reference: 5.68 B)."""
    d = cfg.d_model
    layer = 4 * d * d + 3 * d * cfg.d_ff + 2 * d + cfg.num_buckets * cfg.num_heads
    return cfg.num_layers * layer + cfg.vocab_size * d + d


# Decoder (+ post_quant_conv) parameters and the 32 causal-cache slots (channels, spatial factor vs
# the latent) of the full-size decoders, traced from diffusers' AutoencoderKLWan on the meta device
# (tests/test_residency.py re-traces them). Each slot holds 2 frames: [1, C, 2, k·h, k·w].
VAE_DECODER_PARAMS = {"wan2.1": 73_295_603, "wan2.2": 555_051_580}
VAE_CACHE_SLOTS: dict[str, tuple[tuple[int, int], ...]] = {
    "wan2.1": ((16, 1),) + ((384, 1),) * 11 + ((192, 2),) + ((384, 2),) * 6 + ((192, 4),) * 6 + ((96, 8),) * 7,
    "wan2.2": ((48, 1),) + ((1024, 1),) * 11 + ((1024, 2),) * 7 + ((1024, 4),) + ((512, 4),) * 5
    + ((512, 8),) + ((256, 8),) * 6,
}


# Image-to-video (stage "image", before denoising; released after it): the streaming VAE encoder
# (+ quant_conv) and Wan2.1's CLIP ViT-H/14 vision tower, parameters counted on diffusers' /
# transformers' full-size modules on the meta device. The encoder runs untiled (as the reference);
# its steady-state causal caches, fp32, per video pixel: i2v.md §3 ([CHK vae_cache_shapes.out]:
# 2.09 GiB at 480x832 for Wan2.1, 1.98 GiB at 704x1280 for Wan2.2); a step holds caches in + out.
VAE_ENCODER_PARAMS = {"wan2.1": 53_596_928, "wan2.2": 149_637_088}
CLIP_VISION_PARAMS = 630_766_080  # ViT-H/14, 32 layers x 1280 (all kept; Wan uses the output of layer 31)
VAE_ENCODER_CACHE_BYTES_PER_PX = {"wan2.1": 2.09 * GiB / (480 * 832), "wan2.2": 1.98 * GiB / (704 * 1280)}
ENCODER_ACTIVATION_FACTOR = 2.0  # activations of one 4-frame step, in units of its cache set (an allowance)


def vae_step_contract(spec: ModelSpec) -> Contract:
    """The step graph's contract of the full-size decoder (for variants without a package)."""
    slots = VAE_CACHE_SLOTS.get(spec.vae.kind)
    if slots is None:
        raise UsageError(f"no VAE cache table for VAE kind {spec.vae.kind!r}; pass a model package instead")

    def sym(k: int, name: str) -> str:
        return name if k == 1 else f"{k}*{name}"

    shapes: list[tuple[int | str, ...]] = [(1, c, 2, sym(k, "lat_h"), sym(k, "lat_w")) for c, k in slots]
    return C.vae_contracts(spec, shapes)[1]


# ---- bytes ------------------------------------------------------------------------------------------


def dit_weight_bytes(cfg: DiTConfig, precision: str, fp8_scope: str = DEFAULT_FP8_SCOPE, fp8_rest: int = 2) -> int:
    """Device bytes of one DiT's weights at an engine precision.

    fp32 parts (norms, modulation, time embedding/projection) stay 4 bytes in every low-precision
    graph (export/components.py DIT_FP32_PARTS). fp8: per-tensor E4M3 weights (1 byte) in blocks
    FP8_KEEP_BLOCKS..L-1-FP8_KEEP_BLOCKS; `fp8_scope` "ffn" quantises only the feed-forward
    matrices (the qualified first step), "linear" also the attention matrices. The rest is bf16
    (`fp8_rest` = 2 bytes), or fp32 (4) in the graphs `vidrt export --precision fp8` writes today.
    """
    p = dit_params(cfg)
    if precision not in BYTES:
        raise UsageError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return 4 * p.total
    hi = fp8_rest if precision == "fp8" else 2  # fp16 / bf16, and fp8's high-precision parts
    block_hp = hi * (p.block_linear_weights + p.block_ffn_weights + p.block_other - p.block_fp32) + 4 * p.block_fp32
    outside = hi * (p.outside - p.outside_fp32) + 4 * p.outside_fp32
    if precision != "fp8":
        return p.num_layers * block_hp + outside
    kept = min(p.num_layers, 2 * FP8_KEEP_BLOCKS)
    q_weights = p.block_ffn_weights + (p.block_linear_weights if fp8_scope == "linear" else 0)
    block_q = block_hp - hi * q_weights + 1 * q_weights
    return kept * block_hp + (p.num_layers - kept) * block_q + outside


def text_weight_bytes(cfg: TextConfig, precision: str) -> int:
    """umT5 runs bf16 (never fp16: it overflows) or fp32. In bf16 the FFN output matrices `wo`
    (d_ff -> d, one per layer) stay fp32: transformers' UMT5PreTrainedModel `_keep_in_fp32_modules =
    ["wo"]`, which export/onnx_export.py's export_text_encoder follows. umT5-XXL: 12.46 GiB."""
    n = text_param_count(cfg)
    if precision == "fp32":
        return 4 * n
    wo = cfg.num_layers * cfg.d_model * cfg.d_ff
    return 4 * wo + 2 * (n - wo)


def tensor_bytes(t: TensorSpec, sizes: dict[str, int]) -> int:
    try:
        itemsize = DTYPE_BYTES[t.dtype]
    except KeyError:
        raise UsageError(f"tensor {t.name} has dtype {t.dtype!r} that the plan does not know") from None
    return math.prod(resolve_shape(t.shape, sizes)) * itemsize


def io_bytes(contract: Contract, sizes: dict[str, int]) -> int:
    """Bytes of every input and output of one call at these symbolic sizes (the preallocated buffers)."""
    return sum(tensor_bytes(t, sizes) for t in contract.inputs + contract.outputs)


def dit_activation_bytes(spec: ModelSpec, tokens: int, batch: int, precision: str) -> int:
    """Estimated activation memory of one DiT call (no engine report yet).

    TensorRT reuses activation memory from block to block, so the peak is one block's live set, per
    token (d = dim, f = ffn_dim, a = bytes of the low-precision dtype; the residual stream is fp32):
      attention: residual x 4d + q, k, v 3ad + RoPE'd q, k 2ad + output ad + new residual 4d
                 = 8d + 6ad   (fused flash attention: no tokens² score matrix)
      FFN:       residual x 4d + modulated norm ad + hidden af + GELU(hidden) af + output ad
                 + new residual 4d = 8d + a(2d + 2f)   (GELU counted apart, in case it is not fused)
    TI2V's per-token timestep adds the per-token embedding and 6-way modulation, fp32: 4d + 24d.
    Text context and cross-attention K/V: 512 rows x (text_dim + 2d) x a per batch item.
    Plus DIT_WORKSPACE_BYTES of tactic scratch.
    """
    d, f = spec.dit.dim, spec.dit.ffn_dim
    a = 4 if precision == "fp32" else 2
    per_token = max(8 * d + 6 * a * d, 8 * d + a * (2 * d + 2 * f))
    if spec.per_token_timestep:
        per_token += 28 * d
    context = spec.text.text_len * (spec.dit.text_dim + 2 * d) * a
    return batch * (tokens * per_token + context) + DIT_WORKSPACE_BYTES


# Copies of the [batch, heads, L, L] fp32 attention scores alive at once when ONNX Runtime's CPU provider
# runs the exported DiT (MatMul -> Softmax -> MatMul: no fused attention, the scores are materialised).
# Measured as the peak-RSS growth of one call over one copy: 2.34x and 2.18x on the bundled model at
# 512x512x17 and 768x768x17 (5120 and 11520 tokens, batch 2); but a batch-1 call at 1024x1024x17 (20480
# tokens, one copy 6.25 GiB) reached 19.3 GiB RSS before the kernel killed it (3.1 copies): ORT's BFC
# arena grows in doubling chunks, so the peak is lumpy. 4 copies keeps that case out; the cost of erring
# high is only two batch-1 CFG calls, or a refusal, where a run might just have fit.
ORT_SCORE_COPIES = 4.0


def ort_dit_host_bytes(spec: ModelSpec, width: int, height: int, frames: int, batch: int) -> int:
    """Host memory one DiT call on ONNX Runtime's CPU provider needs beyond its weights, in bytes:
    ORT_SCORE_COPIES x batch x heads x L² x 4 B of attention scores (L = tokens) plus the per-token fp32
    activations of dit_activation_bytes. Wan2.1-1.3B at 832x480x81 (32760 tokens, 12 heads): ~200 GiB
    at batch 1, which is why such clips need a GPU; at 64x64x5 (32 tokens), ~17 MiB."""
    tokens = spec.num_tokens(width, height, frames)
    scores = ORT_SCORE_COPIES * batch * spec.dit.num_heads * tokens * tokens * 4
    return int(scores) + dit_activation_bytes(spec, tokens, batch, "fp32") - DIT_WORKSPACE_BYTES


def text_activation_bytes(cfg: TextConfig, batch: int, seq: int, precision: str) -> int:
    """umT5 at `seq` tokens: per token 8d + a(4d + 3 d_ff) (fp32 residual, q/k/v/o, gated FFN), plus the
    unfused attention scores with the relative-position bias: heads x seq² x 4 bytes, twice (scores, softmax)."""
    a = 4 if precision == "fp32" else 2
    d = cfg.d_model
    return batch * (seq * (8 * d + a * (4 * d + 3 * cfg.d_ff)) + 2 * cfg.num_heads * seq * seq * 4) + 256 * MiB


# ---- engine reports (written by `vidrt build` next to the plans) -------------------------------------


@dataclass(frozen=True)
class EngineReport:
    """What TensorRT said about a built engine: `device_memory_bytes` = device_memory_size_v2 (the
    scratch of its largest profile), `weight_bytes` = the plan's weights, `profiles` = (width, height,
    frames, batch, get_device_memory_size_for_profile_v2) per optimisation profile (DiT plans)."""

    device_memory_bytes: int
    weight_bytes: int | None = None
    profiles: tuple[tuple[int, int, int, int, int], ...] = ()

    def activation_bytes(self, batch: int, size: tuple[int, int, int] | None = None) -> int:
        """Scratch of the profile a call at `batch` (and `size` = (width, height, frames)) selects;
        the engine binds exactly that much (TrtEngine.scratch_bytes). Largest profile's if unknown."""
        match = [b for w, h, f, n, b in self.profiles if n == batch and (size is None or (w, h, f) == size)]
        return max(match) if match else self.device_memory_bytes


def _report(r: dict[str, object]) -> EngineReport:
    def num(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError(f"not a number: {v!r}")
        return int(v)

    profiles = r.get("profiles") or []
    if not isinstance(profiles, list):
        raise TypeError("profiles is not a list")
    return EngineReport(num(r["device_memory_bytes"]),
                        num(r["weight_bytes"]) if r.get("weight_bytes") is not None else None,
                        tuple((num(p["width"]), num(p["height"]), num(p["frames"]), num(p["batch"]),
                               num(p["device_memory_bytes"])) for p in profiles))


def load_reports(package: Path, manifest: Manifest, precision: str) -> dict[str, EngineReport]:
    """report.json of the engine folders built at `precision` (any GPU: the figures barely move).
    An entry without the figures (a failed or partial build) is skipped on its own."""
    out: dict[str, EngineReport] = {}
    folders = sorted({Path(e.artifact.file).parent for e in manifest.engines if e.artifact.file.split("/")[0]
                      .endswith(f"-{precision}")})
    for folder in folders:
        path = package / folder / "report.json"
        if not path.is_file():
            continue
        try:
            engines = json.loads(path.read_text()).get("engines", {})
        except (ValueError, AttributeError):
            continue
        if not isinstance(engines, dict):
            continue
        for comp, r in engines.items():
            try:
                out[comp] = _report(r)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
    return out


# ---- the plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    how: str  # where the number comes from


@dataclass(frozen=True)
class Stage:
    name: str
    items: tuple[Item, ...]
    load: tuple[str, ...] = ()  # engines loaded at the start of the stage
    release: tuple[str, ...] = ()  # engines released at its end

    @property
    def peak(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass(frozen=True)
class ResidencyPlan:
    model: str
    width: int
    height: int
    frames: int
    precision: str
    budget: int
    stages: tuple[Stage, ...]
    all_resident: bool
    cfg_batch: int
    vae_tile: TilePlan
    streamed: dict[str, int] = field(default_factory=dict)  # engine -> weight bytes streamed per call
    notes: tuple[str, ...] = ()
    host_bytes: int = 0  # host RAM the run needs at its peak (see _finish)
    text_device: str = "gpu"  # where umT5 runs: "gpu" (TensorRT) or "cpu" (ONNX Runtime)
    decode_order: str = "frame"  # vae_decode.iter_decode order: "tile" (bounded by the tile) or "frame"

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def table(self) -> str:
        lines = [f"{self.model} {self.width}x{self.height}x{self.frames}, DiT {self.precision}, "
                 f"budget {_gib(self.budget)} ({self.budget:,} B)",
                 f"{'stage':<22}{'item':<34}{'GiB':>9}  source"]
        for s in self.stages:
            first = True
            for it in s.items:
                lines.append(f"{s.name if first else '':<22}{it.name:<34}{it.bytes / GiB:>9.2f}  {it.how}")
                first = False
            verdict = "ok" if s.peak <= self.budget else f"OVER by {_gib(s.peak - self.budget)}"
            moves = "; ".join(x for x in (f"load {', '.join(s.load)}" if s.load else "",
                                          f"release {', '.join(s.release)}" if s.release else "") if x)
            lines.append(f"{'':<22}{'= peak':<34}{s.peak / GiB:>9.2f}  {verdict}" + (f"  [{moves}]" if moves else ""))
        th, tw = self.vae_tile.tile_shape
        lines.append(f"residency: {'everything resident' if self.all_resident else 'per stage'}; "
                     f"VAE decode {self.decode_order}-major; "
                     f"CFG {'one batch-2 call' if self.cfg_batch == 2 else 'two batch-1 calls'} per step; "
                     f"VAE tile {th}x{tw} latent cells ({self.vae_tile.count} tiles, "
                     f"{th * self.vae_tile.rows.scale}x{tw * self.vae_tile.cols.scale} px)")
        for name, b in self.streamed.items():
            lines.append(f"weight streaming: {name} streams {_gib(b)} per call, about {b / PCIE_BYTES_PER_S:.2f} s "
                         f"at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s (build it with --weight-streaming)")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(f"peak {_gib(self.peak)} of {_gib(self.budget)}: "
                     + ("fits" if self.fits else "DOES NOT FIT") + f"; host RAM {_gib(self.host_bytes)}"
                     + f" (text encoder on the {self.text_device.upper()})")
        return "\n".join(lines)


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB"


def dit_sizes(spec: ModelSpec, width: int, height: int, frames: int, batch: int) -> dict[str, int]:
    _, f, h, w = spec.latent_shape(width, height, frames)
    return {"batch": batch, "frames": f, "height": h, "width": w,
            "tokens": spec.num_tokens(width, height, frames)}


HOST_BASE_BYTES = 2 * GiB  # Python, numpy, ONNX Runtime, the CUDA driver's host side: an allowance
TEXT_DEVICES = ("gpu", "cpu")


def make_plan(spec: ModelSpec, width: int, height: int, frames: int, budget: int, precision: str = "bf16", *,
              fp8_scope: str = DEFAULT_FP8_SCOPE, weight_bytes: dict[str, int] | None = None,
              reports: dict[str, EngineReport] | None = None, contracts: dict[str, Contract] | None = None,
              text_precision: str | None = None, reserve: int = RESERVE_BYTES,
              vae_tile: tuple[int, int] | None = None, text_device: str | None = None,
              decode_order: str | None = None, image: bool | None = None, cache: str = "none") -> ResidencyPlan:
    """The plan for one clip. `weight_bytes` (engine -> bytes, e.g. from ONNX sizes), `reports` (from
    built engines) and `contracts` (from a package's manifest) override the architecture formulas.
    `vae_tile` = (tile_h, tile_w): the tile the VAE engines were built for (TensorRT: fixed; the plan
    checks it fits, it does not choose another). `text_device` "gpu" / "cpu" (umT5 on ONNX Runtime,
    host RAM instead of device memory); None: the GPU when the clip fits that way, else the CPU.
    `decode_order` "tile" / "frame" (vae_decode.iter_decode); None: the one needing fewer tiles.
    `cache`: the `--cache` method; its residual buffers stay resident through the denoise stage."""
    if text_device is None:
        plan = make_plan(spec, width, height, frames, budget, precision, fp8_scope=fp8_scope,
                         weight_bytes=weight_bytes, reports=reports, contracts=contracts,
                         text_precision=text_precision, reserve=reserve, vae_tile=vae_tile, text_device="gpu",
                         decode_order=decode_order, image=image, cache=cache)
        if plan.fits:
            return plan
        on_cpu = make_plan(spec, width, height, frames, budget, precision, fp8_scope=fp8_scope,
                           weight_bytes=weight_bytes, reports=reports, contracts=contracts,
                           text_precision=text_precision, reserve=reserve, vae_tile=vae_tile, text_device="cpu",
                           decode_order=decode_order, image=image, cache=cache)
        return on_cpu if on_cpu.fits else plan
    if text_device not in TEXT_DEVICES:
        raise UsageError(f"{arg('text_device')} {text_device!r}: use gpu or cpu")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    m = spec.spatial_multiple
    if width % m or height % m or (frames - 1) % spec.vae.stride[0]:
        raise UsageError(f"{width}x{height}x{frames} is not a valid {spec.name} size: width and height must be "
                         f"multiples of {m} and frames 4k+1")
    weight_bytes, reports, contracts = weight_bytes or {}, reports or {}, contracts or {}
    text_prec = text_precision or ("fp32" if precision == "fp32" else "bf16")
    dit_dtype = {"fp32": "float32", "fp16": "float16"}.get(precision, "bfloat16")
    notes: list[str] = []
    size = (width, height, frames)

    def weights(engine: str, formula: int, what: str) -> Item:
        if engine in reports and reports[engine].weight_bytes is not None:
            return Item(f"{engine} weights", int(reports[engine].weight_bytes or 0), "engine report")
        if engine in weight_bytes:
            return Item(f"{engine} weights", weight_bytes[engine], "ONNX weight bytes")
        return Item(f"{engine} weights", formula, what)

    def activations(engine: str, estimate: int, what: str, batch: int | None = None) -> Item:
        if engine in reports:
            r = reports[engine]
            if batch is not None and r.profiles:
                return Item(f"{engine} activations", r.activation_bytes(batch, size),
                            f"get_device_memory_size_for_profile_v2, batch {batch}")
            return Item(f"{engine} activations", r.device_memory_bytes, "device_memory_size_v2")
        return Item(f"{engine} activations", estimate, what)

    reserve_item = Item("CUDA context + libraries", reserve, "reserve")
    easy = _gib(cache_residual_bytes(spec, width, height, frames, "easycache"))
    cache_notes = [f"easycache keeps v - x per CFG row ({easy}) in host memory: the whole DiT graph runs, its "
                   f"output comes back every step"] if cache.partition(":")[0] == "easycache" else []

    # text (umT5 on the GPU, or on ONNX Runtime CPU: then host RAM only)
    te_contract = contracts.get(C.TEXT_ENCODER, C.text_encoder_contract(spec))
    te_sizes = {"batch": 2, "seq": spec.text.text_len}
    te_items = (weights(C.TEXT_ENCODER, text_weight_bytes(spec.text, text_prec),
                        f"{text_param_count(spec.text) / 1e9:.3f} B params x {text_prec} (wo fp32)"),
                activations(C.TEXT_ENCODER, text_activation_bytes(spec.text, 2, spec.text.text_len, text_prec),
                            "estimate, 2 prompts x 512 tokens"),
                Item(f"{C.TEXT_ENCODER} I/O", io_bytes(te_contract, te_sizes), "contract shapes x dtypes"))
    te_gpu = te_items if text_device == "gpu" else ()

    # denoise, per expert, at CFG batch 2 then 1. The backend's I/O buffers are sized for the largest
    # profile (batch 2), whatever the batch of the calls.
    tokens = spec.num_tokens(width, height, frames)
    n_params = dit_param_count(spec.dit)

    def dit_items(expert: str, batch: int) -> tuple[Item, ...]:
        contract = contracts.get(expert, C.dit_contract(spec, dit_dtype))
        w = weights(expert, dit_weight_bytes(spec.dit, precision, fp8_scope),
                    f"{n_params / 1e9:.3f} B params, {precision}" + (f" ({fp8_scope})" if precision == "fp8" else ""))
        # no engine report: the per-token estimate plus a fixed tactic-scratch reserve (what TensorRT's tactics
        # take is known only once `vidrt build` has chosen them; its report then replaces both)
        act = activations(expert, dit_activation_bytes(spec, tokens, batch, precision),
                          f"estimate, {tokens:,} tokens x batch {batch} + {DIT_WORKSPACE_BYTES / GiB:g} GiB fixed "
                          f"tactic-scratch reserve (until `vidrt build` reports it)", batch)
        io = Item(f"{expert} I/O", io_bytes(contract, dit_sizes(spec, width, height, frames, 2)),
                  "contract shapes x dtypes, batch 2 (profile max)")
        method = cache.partition(":")[0]
        if method not in PIECE_METHODS:  # none; EasyCache runs the whole graph and keeps its cache on the host
            return (w, act, io)
        residuals = Item(f"{method} residuals", cache_residual_bytes(spec, width, height, frames, method),
                         "fp32 residual stream x 2 CFG rows, on the device (vidrt.caching)")
        # the DiT as its pieces (the same weights, cut apart): the tensors handed between them stay on the device
        chain = Item(f"{expert} pieces' tensors", pieces_tensor_bytes(spec, width, height, frames,
                                                                      DTYPE_BYTES[dit_dtype]),
                     "x_0 + block output in + out (fp32 [2, L, dim]), context_emb, e0, temb, RoPE, latents")
        return (Item(f"{expert} pieces weights", w.bytes, w.how), act, io, chain, residuals)

    # decode: the first-frame engine over every tile (frame 0), released; then the step engine. Each
    # tile's causal caches stay on the device between latent frames (frame-major order).
    vae_params = VAE_DECODER_PARAMS.get(spec.vae.kind, 0)
    step_contract = contracts.get(C.VAE_STEP) or vae_step_contract(spec)
    _, _, lat_h, lat_w = spec.latent_shape(width, height, frames)
    vae_w = {name: weights(name, 4 * vae_params, f"{vae_params / 1e6:.1f} M params x fp32")
             for name in (C.VAE_FIRST, C.VAE_STEP)}
    scale = spec.vae.stride[1]

    too_big = "the VAE does not fit even with the smallest tiles"

    def choose(room: int, order: str) -> tuple[TilePlan, bool]:
        """The tile plan for `order` in `room`, and whether even the smallest tiles are too big (then the
        smallest tiles: the plan shows by how much they are over)."""
        if vae_tile is not None:
            return plan_tiles(lat_h, lat_w, vae_tile[0], vae_tile[1], scale=scale, pad_to_tile=True), False
        weights_on = sum(i.bytes for i in vae_w.values()) if order == "tile" else max(i.bytes for i in vae_w.values())
        try:  # frame-major: every tile's caches are held on the device too (same_memory)
            return choose_tile(step_contract, lat_h, lat_w, max(room - weights_on, 0), scale=scale,
                               same_memory=order == "frame"), False
        except UsageError:
            return plan_tiles(lat_h, lat_w, min(16, lat_h), min(16, lat_w), scale=scale), True

    def tile_major_items(tile: TilePlan) -> tuple[Item, ...]:
        """Both VAE engines open, one tile's caches alive (in + out): bounded by the tile."""
        first, step = decode_items(C.VAE_FIRST, tile), decode_items(C.VAE_STEP, tile)
        est = estimate_memory(step_contract, tile)
        arena = max(first[1], step[1], key=lambda i: i.bytes)
        return (first[0], step[0], Item("VAE scratch (shared arena)", arena.bytes, f"largest: {arena.name}"),
                first[2], step[2], Item("one tile's caches, in + out", 2 * est.cache_bytes,
                                        f"2 x {est.cache_bytes / MiB:.0f} MiB, on the device"))

    def decode_stages(room: int) -> tuple[str, TilePlan, list[Stage]]:
        """The decode order that needs fewer tiles (less redundant overlap work) in `room`; on a tie the
        tile-major one (one stage, bounded by the tile) unless it does not fit and frame-major does."""
        (t_tile, tile_over), (t_frame, frame_over) = choose(room, "tile"), choose(room, "frame")
        tile_stage = [Stage("decode", (reserve_item, *tile_major_items(t_tile)), load=(C.VAE_FIRST, C.VAE_STEP))]
        frame_stages = [Stage("decode frame 0", (reserve_item, *decode_items(C.VAE_FIRST, t_frame)),
                              load=(C.VAE_FIRST,), release=(C.VAE_FIRST,)),
                        Stage("decode", (reserve_item, *decode_items(C.VAE_STEP, t_frame)), load=(C.VAE_STEP,))]
        tile_fits = max(s.peak for s in tile_stage) <= budget
        frame_fits = max(s.peak for s in frame_stages) <= budget
        if decode_order is not None:
            order = decode_order
        elif tile_fits and (not frame_fits or t_tile.count <= t_frame.count):
            order = "tile"
        elif frame_fits or max(s.peak for s in frame_stages) < max(s.peak for s in tile_stage):
            order = "frame"
        else:
            order = "tile"
        if (tile_over if order == "tile" else frame_over):  # the note is about the order chosen, not the other
            notes.append(too_big)
        return (order, t_tile, tile_stage) if order == "tile" else (order, t_frame, frame_stages)

    def decode_items(engine: str, tile: TilePlan) -> tuple[Item, ...]:
        est = estimate_memory(step_contract, tile)
        th, tw = tile.tile_shape
        sizes = {"lat_h": th, "lat_w": tw, "out_h": th * scale, "out_w": tw * scale}
        io = tensor_bytes(step_contract.input(C.VAE_LATENT), sizes) + tensor_bytes(step_contract.output(C.VAE_FRAMES),
                                                                                   sizes)
        items = [vae_w[engine], activations(engine, est.work_bytes - io, f"estimate, {th}x{tw} tile"),
                 Item(f"{engine} I/O", io, "latent tile in, frames out"),
                 Item("VAE caches of every tile", tile.count * est.cache_bytes,
                      f"{tile.count} tiles x {est.cache_bytes / MiB:.0f} MiB, kept on the device")]
        if engine == C.VAE_STEP:
            items.append(Item("the running tile's new caches", est.cache_bytes, "cache_out of one step"))
        return tuple(items)

    # image (image-to-video models): the encoder graphs (+ CLIP), used once, released before denoising
    image_items: tuple[Item, ...] = ()
    image_engines: tuple[str, ...] = ()
    if image is None:  # `image`: is the clip conditioned on one? Default: where the model needs one (I2V)
        image = spec.image is not None and spec.image.required
    if image and spec.image is not None:
        enc_params = VAE_ENCODER_PARAMS.get(spec.vae.kind, 0)
        caches = int(VAE_ENCODER_CACHE_BYTES_PER_PX.get(spec.vae.kind, 0) * width * height)
        image_engines = (C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP)
        image_items = (*(weights(n, 4 * enc_params, f"{enc_params / 1e6:.1f} M params x fp32") for n in image_engines),
                       Item("VAE encoder caches, in + out", 2 * caches, "i2v.md §3 bytes per pixel, untiled"),
                       Item("VAE encoder activations", int(ENCODER_ACTIVATION_FACTOR * caches),
                            f"allowance, {ENCODER_ACTIVATION_FACTOR:g} x the caches"))
        if spec.image.clip_size:
            image_engines += (C.IMAGE_ENCODER,)
            image_items += (weights(C.IMAGE_ENCODER, 4 * CLIP_VISION_PARAMS,
                                    f"{CLIP_VISION_PARAMS / 1e6:.0f} M params x fp32"),)

    experts = spec.experts
    # 1. everything resident? One shared scratch arena: as large as the largest engine's need. Only
    # when that costs the decode no extra tiles (smaller tiles = more redundant overlap work).
    staged_tiles = choose(budget - reserve, "tile")[0].count
    notes.clear()
    # The image encoders run once, before denoising, and are always released after (pipeline.conditioning):
    # they are never part of the resident set; while they run, only the text encoder (if on the GPU) is open.
    image_stage = [Stage("image", (reserve_item, *te_gpu, *image_items), load=image_engines, release=image_engines)] \
        if image_items else []
    for batch in (2, 1):
        dits = [it for e in experts for it in dit_items(e, batch)]
        fixed = [reserve_item, *te_gpu, *dits]
        fixed_acts = [i.bytes for i in fixed if i.name.endswith(" activations")]
        # the arena is the largest need, not the sum: room = what the fixed items leave, their largest
        # scratch included once (the VAE's own scratch is counted by choose_tile on top: conservative)
        tile, too_small = choose(budget - sum(i.bytes for i in fixed) + sum(fixed_acts) - max(fixed_acts, default=0),
                                 "tile")
        first, step = decode_items(C.VAE_FIRST, tile), decode_items(C.VAE_STEP, tile)
        est = estimate_memory(step_contract, tile)
        vae = [first[0], first[1], first[2], step[0], step[1], step[2],
               Item("one tile's caches, in + out", 2 * est.cache_bytes, "on the device")]
        every = [*fixed, *vae]
        acts = [i for i in every if i.name.endswith(" activations")]
        arena = max(acts, key=lambda i: i.bytes)
        together = [i for i in every if i not in acts] + [Item("shared scratch arena", arena.bytes,
                                                               f"largest: {arena.name} ({arena.how})")]
        if sum(i.bytes for i in together) <= budget and not too_small and tile.count <= staged_tiles \
                and all(st.peak <= budget for st in image_stage):
            stage = Stage("all stages", tuple(together), load=((C.TEXT_ENCODER,) if te_gpu else ()) + (
                *experts, C.VAE_FIRST, C.VAE_STEP))
            return _finish(spec, width, height, frames, precision, budget, (*image_stage, stage), True, batch, tile, {},
                           [*notes, *cache_notes], text_device, te_items, "tile")
        notes.clear()

    # 2. per stage
    stages = [Stage("text", (reserve_item, *te_items), load=(C.TEXT_ENCODER,), release=(C.TEXT_ENCODER,))] \
        if te_gpu else []
    if image_items:
        stages.append(Stage("image", (reserve_item, *image_items), load=image_engines, release=image_engines))
    streamed: dict[str, int] = {}
    cfg_batch = 2
    dit_stage_items: dict[str, tuple[Item, ...]] = {}
    for e in experts:
        items = dit_items(e, 2)
        if reserve + sum(i.bytes for i in items) > budget:
            cfg_batch = 1
    for e in experts:
        items = dit_items(e, cfg_batch)
        over = reserve + sum(i.bytes for i in items) - budget
        if over > 0:  # 4. weight streaming: keep what fits, stream the rest every call
            w = items[0]
            over += STREAMING_SCRATCH_BYTES
            resident = w.bytes - over
            if resident <= 0:
                notes.append(f"{e}: activations alone exceed the budget; choose a smaller size or fewer frames")
            else:
                streamed[e] = over
                items = (Item(f"{e} weights (resident part)", resident, f"{w.how}; {_gib(over)} streamed"),
                         Item(f"{e} weight-streaming scratch", STREAMING_SCRATCH_BYTES, "allowance"),
                         *items[1:])
        dit_stage_items[e] = items
    if len(experts) > 1:
        both = reserve + sum(i.bytes for e in experts for i in dit_stage_items[e])
        if both <= budget and not streamed:
            stages.append(Stage("denoise", (reserve_item, *(i for e in experts for i in dit_stage_items[e])),
                                load=experts, release=experts))
        else:
            for e in experts:
                label = "denoise " + e.removeprefix("dit_")
                stages.append(Stage(label, (reserve_item, *dit_stage_items[e]), load=(e,), release=(e,)))
            notes.append("the experts swap once at the boundary (the second is deserialised from its file then)")
    else:
        e = experts[0]
        stages.append(Stage("denoise", (reserve_item, *dit_stage_items[e]), load=(e,), release=(e,)))
    order, tile, decode = decode_stages(budget - reserve)
    stages.extend(decode)
    if cfg_batch == 1:
        notes.append("CFG as two batch-1 DiT calls per step (batch 2 does not fit)")
    return _finish(spec, width, height, frames, precision, budget, tuple(stages), False, cfg_batch, tile, streamed,
                   [*notes, *cache_notes], text_device, te_items, order)


def _finish(spec: ModelSpec, width: int, height: int, frames: int, precision: str, budget: int,
            stages: tuple[Stage, ...], all_resident: bool, cfg_batch: int, tile: TilePlan, streamed: dict[str, int],
            notes: list[str], text_device: str, te_items: tuple[Item, ...], decode_order: str) -> ResidencyPlan:
    """Adds the host-RAM side: TensorRT keeps a weight-streaming engine's weights in host memory
    (all of them; the budget part is also copied to the device), the text encoder on the CPU holds
    its weights and activations, and the clip's uint8 frames are collected unless they are streamed."""
    host_stage = []
    for s in stages:
        held = 0
        for e, b in streamed.items():
            if e in s.load:
                held += b + next(i.bytes for i in s.items if i.name.startswith(f"{e} weights"))
        host_stage.append(held)
    text_host = sum(i.bytes for i in te_items) if text_device == "cpu" else 0
    video = frames * width * height * 3  # the clip's uint8 frames, unless a writer consumes them
    if decode_order == "tile":
        video += frames * width * height * 3 * 4  # the float32 clip buffer tile-major decoding assembles
    host = HOST_BASE_BYTES + max([*host_stage, text_host]) + video
    if text_device == "cpu":
        notes = [*notes, "text encoder on the CPU (ONNX Runtime): no device memory; prompt embeddings are cached "
                         "on disk, so a repeated prompt does not run it again"]
    return ResidencyPlan(spec.name, width, height, frames, precision, budget, stages, all_resident, cfg_batch, tile,
                         streamed, tuple(notes), host, text_device, decode_order)


PIECE_METHODS = ("teacache", "magcache", "fbcache")  # vidrt.caching.PIECES_NEEDED: they run the DiT's pieces


def pieces_tensor_bytes(spec: ModelSpec, width: int, height: int, frames: int, latent_itemsize: int = 4) -> int:
    """Device bytes of the tensors handed between the DiT's pieces while a step runs them (vidrt.caching
    ExpertDiT on TensorRT, beside the residuals): the residual stream [2, L, dim] fp32 three times at
    once (x_0, the block piece's input and its output), the step-invariant context embedding
    [2, 512, dim] and RoPE tables [1, L, 1, head_dim] x 2, the time embeddings e [2, dim] and
    e0 [2, 6 dim] (per token for TI2V: [2, L, ...]); fp32 (the pieces keep the residual stream and the
    time embedding in fp32, export/components.py). Plus the latents input buffer [2, C_in, F, H, W] of
    each piece that reads it (patch_embed, block0, blocks_rest, head; TI2V's time_embed too) beyond
    the one the whole graph's I/O counts, at `latent_itemsize` bytes (the DiT graph's input dtype)."""
    d, tokens = spec.dit.dim, spec.num_tokens(width, height, frames)
    per_row_time = tokens if spec.per_token_timestep else 1
    stream = 3 * 2 * tokens * d
    context = 2 * spec.text.text_len * d
    rope = 2 * tokens * spec.dit.head_dim
    time = 2 * per_row_time * 7 * d
    _, f, h, w = spec.latent_shape(width, height, frames)
    latents = (3 + int(spec.per_token_timestep)) * 2 * spec.dit.in_channels * f * h * w * latent_itemsize
    return 4 * (stream + context + rope + time) + latents


def cache_residual_bytes(spec: ModelSpec, width: int, height: int, frames: int, method: str) -> int:
    """Bytes a step cache holds through the denoise stage (fast_paths.md C.6): the block-stack residual
    [2, L, dim] in the fp32 residual stream (TeaCache, MagCache; on the device on TensorRT); First Block
    Cache also keeps block 0's residual; EasyCache keeps v - x per CFG row, latent-sized (host memory:
    it runs the whole graph, whose output comes back to the host every step)."""
    if method == "easycache":
        c, f, h, w = spec.latent_shape(width, height, frames)
        return 2 * c * f * h * w * 4
    one = 2 * spec.num_tokens(width, height, frames) * spec.dit.dim * 4
    return 2 * one if method == "fbcache" else one


def plan_for_package(package: Path, manifest: Manifest, width: int, height: int, frames: int, budget: int,
                     precision: str, fp8_scope: str = DEFAULT_FP8_SCOPE,
                     vae_tile: tuple[int, int] | None = None, text_device: str | None = None,
                     image: bool | None = None, cache: str = "none") -> ResidencyPlan:
    """As make_plan, with the package's contracts, ONNX weight bytes (rescaled to `precision` when the
    ONNX has another one) and any engine reports of a build at that precision."""
    spec = manifest.model
    weight_bytes: dict[str, int] = {}
    try:  # written by `vidrt export --precision fp8` (export/quantize_fp8.py FP8_REPORT)
        fp8 = json.loads((package / "fp8_report.json").read_text()).get("experts", {})
        fp8 = fp8 if isinstance(fp8, dict) else {}
    except (OSError, ValueError, AttributeError):
        fp8 = {}
    for name, comp in manifest.components.items():
        onnx = comp.artifact.size_bytes + (comp.artifact.data_size_bytes or 0)
        if name in spec.experts:
            if comp.precision == "fp8":  # export/quantize_fp8.py's graph: fp32 weights + Q/DQ, the rest fp32
                exported = fp8.get(name, {}).get("engine_weight_bytes")
                if isinstance(exported, int):  # counted from the graph at export
                    weight_bytes[name] = exported
                    continue
                target, source = dit_weight_bytes(spec.dit, "fp8", fp8_scope, fp8_rest=4), 4 * dit_param_count(spec.dit)
            else:
                target, source = dit_weight_bytes(spec.dit, precision, fp8_scope), \
                    dit_weight_bytes(spec.dit, comp.precision, fp8_scope)
            weight_bytes[name] = onnx * target // max(source, 1)
        elif name == C.TEXT_ENCODER:
            tp = "fp32" if precision == "fp32" else "bf16"
            weight_bytes[name] = onnx * BYTES[tp] // BYTES[comp.precision if comp.precision in BYTES else "fp32"]
        elif name in (C.VAE_FIRST, C.VAE_STEP, C.VAE_ENCODE_FIRST, C.VAE_ENCODE_STEP, C.IMAGE_ENCODER):
            weight_bytes[name] = onnx * 4 // BYTES.get(comp.precision, 4)
    contracts = {n: c.contract for n, c in manifest.components.items()}
    return make_plan(spec, width, height, frames, budget, precision, fp8_scope=fp8_scope,
                     weight_bytes=weight_bytes, reports=load_reports(package, manifest, precision),
                     contracts=contracts, vae_tile=vae_tile, text_device=text_device, image=image, cache=cache)


__all__ = ["cache_residual_bytes", "pieces_tensor_bytes", "PIECE_METHODS",
           "DiTParams", "dit_params", "dit_param_count", "text_param_count", "VAE_DECODER_PARAMS",
           "VAE_CACHE_SLOTS", "vae_step_contract", "dit_weight_bytes", "text_weight_bytes", "tensor_bytes",
           "io_bytes", "dit_activation_bytes", "ort_dit_host_bytes", "ORT_SCORE_COPIES", "text_activation_bytes",
           "EngineReport", "load_reports", "Item",
           "Stage", "ResidencyPlan", "make_plan", "plan_for_package", "RESERVE_BYTES", "DEFAULT_FP8_SCOPE",
           "HOST_BASE_BYTES", "TEXT_DEVICES"]

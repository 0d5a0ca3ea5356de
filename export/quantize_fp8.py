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

The quantised module is then exported like the bf16 DiT (torch exporter, Q/DQ nodes carry the
scales) and built by `vidrt build --precision fp8` (strongly typed: the Q/DQ nodes are the
precision). Calibrating a 14B expert needs a large GPU; the tests run the same code on a tiny DiT
on the CPU (tests/test_tensorrt.py, skipped when ModelOpt is not installed).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
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


__all__ = ["fp8_config", "kept_blocks", "high_precision_filter", "quantize_dit", "quantized_layers",
           "record_calibration", "SCOPES"]

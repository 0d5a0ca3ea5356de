"""Import the official Wan code (PyPI `wan22`, installed with --no-deps) on a CPU machine.

`wan/__init__.py` and `wan/modules/__init__.py` import every pipeline (easydict, flash_attn, CUDA),
so we register empty parent packages that point at the real folders and import only the leaf
modules we need. `t5.py` calls `torch.cuda.current_device()` in a default argument at import
time, and `model.py` calls flash-attention directly; both are patched here for CPU fp32 parity.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch


def _wan_root() -> Path:
    stub = sys.modules.get("wan")
    if stub is not None and getattr(stub, "_vidrt_stub", False):
        return Path(stub.__path__[0])
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the official `wan` package is missing: pip install --no-deps wan22")
    return Path(list(spec.submodule_search_locations)[0])


def _stub_packages() -> None:
    root = _wan_root()
    modules = root / "modules"
    for name, path in [("wan", root), ("wan.modules", modules), ("wan.utils", root / "utils"),
                       ("wan.modules.animate", modules / "animate"), ("wan.distributed", root / "distributed")]:
        if name in sys.modules and getattr(sys.modules[name], "_vidrt_stub", False):
            continue
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        mod._vidrt_stub = True  # type: ignore[attr-defined]
        sys.modules[name] = mod


def _sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                    q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                    dtype=torch.bfloat16, version=None):
    """fp32 stand-in for wan.modules.attention.flash_attention. q,k,v: [B, L, heads, head_dim]."""
    lk = k.shape[1]
    mask = None
    if k_lens is not None:
        # True where attention is allowed: key index < k_lens[b]
        keep = torch.arange(lk, device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        mask = keep[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(1, 2).contiguous().type_as(q)


def _import_without(missing: tuple[str, ...], name: str) -> types.ModuleType:
    """Import `name` whose module body imports packages it only uses in functions we never call
    (wan.utils.utils: imageio and torchvision, for saving videos): empty stand-ins during the import."""
    added = [m for m in missing if m not in sys.modules and not _findable(m)]
    for m in added:
        sys.modules[m] = types.ModuleType(m)
    try:
        return importlib.import_module(name)
    finally:
        for m in added:
            del sys.modules[m]


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def load(module: str) -> types.ModuleType:
    """`load("modules.model")` -> the official wan.modules.model, patched to run on CPU in fp32."""
    _stub_packages()
    if module == "modules.t5":
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    if module == "utils.utils":
        return _import_without(("imageio", "torchvision"), "wan.utils.utils")
    if module == "modules.animate.clip":  # Wan2.1's CLIP (XLMRobertaCLIP) as wan22 ships it; transforms unused
        from transformers import AutoTokenizer  # noqa: F401  (imported before the torchvision stand-in exists)

        mod = _import_without(("torchvision", "torchvision.transforms"), "wan.modules.animate.clip")
    else:
        mod = importlib.import_module(f"wan.{module}")
    if module in ("modules.model", "modules.animate.clip", "modules.animate.model_animate"):
        mod.flash_attention = _sdpa_attention
    return mod

"""LoRA files -> merged DiT weights in the exported layout, in numpy (DESIGN.md §9; fast_paths.md A.4-A.6).

    lora = read_lora("wan_lightx2v_4step.safetensors")                    # any key format of A.2
    deltas = lora_deltas([(lora, 1.0)], weights, warn)                    # diffusers param -> delta (fp32)
    merged = merge_into(deltas, weights, base)                            # initializer -> W0 + delta

`weights` maps each diffusers parameter of a graph to where it lives in that graph (`WeightRef`: the ONNX
initializer's name, whether the exporter stored a Linear weight transposed, its bytes in the external-data
file); `base(initializer) -> array` reads the BASE value (never a merged one), so a strength change is
W0 + s * delta again, not a second addition. Any graph works (the split DiT of step caching too): the
merge only needs the initializer names and layouts its export recorded.

Scaling (A.4): delta W = strength * (alpha / rank) * B @ A with rank = A.shape[0] (alpha absent: alpha =
rank, i.e. scale 1, as ComfyUI, LightX2V and diffusers; PEFT's `lora_adapter_metadata` {r, lora_alpha}
gives the file-wide alpha); `diff` and `diff_m`: strength * delta of the parameter; `diff_b`: of the bias.
Arithmetic in float32; the result is cast to the initializer's dtype once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from vidrt.errors import UsageError, arg
from vidrt.lora.keys import CanonicalKey, canonical_key
from vidrt.package.manifest import WeightRef

# safetensors dtype names -> numpy (BF16 is read as its uint16 bits and widened; numpy has no bfloat16)
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 << 20
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class _Truncated(Exception):
    """A safetensors file shorter than its own header says (an interrupted download)."""


_JSON_TYPES = {"str": "string", "int": "number", "float": "number", "list": "array", "NoneType": "null",
               "bool": "boolean"}


def _json_type(x: object) -> str:
    return _JSON_TYPES.get(type(x).__name__, type(x).__name__)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _split_header(header: object) -> tuple[dict[str, dict], dict[str, str]]:
    """A parsed safetensors JSON header -> ({tensor name: {dtype, shape, data_offsets}}, metadata), each
    entry checked against the format (safetensors' spec: shape and data_offsets non-negative integers,
    end - start = prod(shape) * itemsize). Raises ValueError naming what is wrong (read_lora turns it into
    the file's one-line UsageError)."""
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {_json_type(header)}, not an object")
    header = dict(header)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"its __metadata__ is a JSON {_json_type(meta)}, not an object")
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise ValueError(f"tensor {name[:60]}: no dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_int(d) for d in shape):
            raise ValueError(f"tensor {name[:60]}: shape {str(shape)[:40]} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise ValueError(f"tensor {name[:60]}: data_offsets {str(offsets)[:40]} is not [start, end]")
        if info["dtype"] in _ST_DTYPES:
            need = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if need != offsets[1] - offsets[0]:
                raise ValueError(f"tensor {name[:60]}: shape {str(shape)[:40]} needs {need} bytes, its "
                                 f"data_offsets hold {offsets[1] - offsets[0]}")
    return header, {str(k): str(v) for k, v in meta.items()}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; returns the uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's tensors (float32) by key, and its safetensors metadata."""

    path: str
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    label: str = ""  # how messages name the file (read_lora's `label`)

    @property
    def named(self) -> str:
        return self.label or f"LoRA {self.path}"


def read_lora(path: str | Path, label: str | None = None) -> LoraFile:
    """Read a .safetensors LoRA without torch (the format: 8-byte little-endian header length, JSON header
    {name: {dtype, shape, data_offsets}, __metadata__}, then the raw little-endian tensor bytes).
    The `safetensors` package's numpy API cannot return bf16, the dtype most published LoRAs use.
    Raises UsageError naming the file for anything that is not a readable safetensors file; `label` is how
    the messages name it (default "LoRA PATH"; `vidrt run` says "--lora PATH", a batch line or a server
    request names it its own way: LoraRef.label). The label is kept in LoraFile.label for the checks
    against the model (lora_deltas)."""
    p, label = _lora_path(path, label)
    with _refusals(label), p.open("rb") as f:
        header, meta = _read_header(f, label)
        body = memoryview(f.read())  # the tensor bytes; data_offsets count from here
        tensors = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
            arr = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
            tensors[name] = bf16_to_f32(arr) if info["dtype"] == "BF16" else arr.astype(np.float32)
            if not np.isfinite(tensors[name]).all():
                raise UsageError(f"{label}: tensor {name[:80]} holds NaN or Inf values; the file is damaged "
                                 f"(or was saved from a diverged training run): use another copy")
    return LoraFile(str(path), tensors, meta, label)


def read_lora_header(path: str | Path, label: str | None = None) -> LoraFile:
    """A .safetensors LoRA's keys and shapes from its header alone (the tensor bytes are not read): each
    tensor a read-only zero-strided float32 array of its shape, enough for lora_deltas(..., dry=True) to
    check the file against a model. Refuses (UsageError, named by `label`) what read_lora refuses from the
    header: not safetensors, truncated, non-float tensors. NaN/Inf values need read_lora."""
    p, label = _lora_path(path, label)
    with _refusals(label), p.open("rb") as f:
        header, meta = _read_header(f, label)
    zero = np.zeros((), np.float32)
    tensors = {name: np.broadcast_to(zero, tuple(int(d) for d in info["shape"])) for name, info in header.items()}
    return LoraFile(str(path), tensors, meta, label)


def _lora_path(path: str | Path, label: str | None) -> tuple[Path, str]:
    """The file and how messages name it; a folder or a missing file refused in one line."""
    p = Path(path)
    label = label or f"LoRA {path}"
    if p.is_dir():
        raise UsageError(f"{label} is a folder; give the path of a .safetensors LoRA file in it")
    if not p.is_file():
        raise UsageError(f"{label}: no such file; give the path of a .safetensors LoRA")
    return p, label


@contextlib.contextmanager
def _refusals(label: str) -> Iterator[None]:
    """What goes wrong reading a file (truncated, unreadable, not safetensors) as one UsageError naming it."""
    try:
        yield
    except _Truncated as exc:
        raise UsageError(f"{label} is truncated or damaged ({exc}); re-download it") from None
    except OSError as exc:
        raise UsageError(f"{label} cannot be read ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise UsageError(f"{label} is not a safetensors LoRA file ({str(exc)[:80]}); "
                         f"convert it to .safetensors") from None


def _read_header(f: BinaryIO, label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor infos, metadata) of the safetensors file open at offset 0 in `f`, which is left at the first
    tensor byte. Checked: the header's length and format (_split_header), that every tensor's bytes lie inside
    the file, floating-point dtypes, at least one tensor. Raises _Truncated / ValueError (for _refusals) or
    UsageError."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if not head:
        raise UsageError(f"{label} is empty (0 bytes: an interrupted download or copy); re-download it")
    if len(head) < 8:  # not even the header's length
        raise _Truncated(f"{size} bytes, the header's length alone needs 8")
    (n,) = struct.unpack("<Q", head)
    if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
        if 0 < n <= MAX_HEADER_BYTES and f.read(1) == b"{":  # a real header, cut short
            raise _Truncated(f"{size} bytes, its header alone needs {8 + n}")
        raise ValueError("bad header length")
    header, meta = _split_header(json.loads(f.read(n)))
    ends = [info["data_offsets"][1] for info in header.values()]
    if ends and 8 + n + max(ends) > size:
        raise _Truncated(f"{size} bytes, its tensors need {8 + n + max(ends)}")
    for name, info in header.items():
        if info["dtype"] not in _FLOAT_DTYPES:
            raise UsageError(f"{label}: tensor {name[:80]} is {info['dtype']}, not floating point; a "
                             f"LoRA's weights are F32/F16/BF16: use a LoRA file, not quantised or other data")
    if not header:
        raise UsageError(f"{label} holds no tensors (a safetensors file with an empty header); it is not a "
                         f"LoRA: use the LoRA file itself")
    return header, meta


def _file_alpha_scale(lora: LoraFile) -> float | None:
    """PEFT's file-wide lora_alpha / r from `lora_adapter_metadata` (diffusers lora_base.py), if given."""
    raw = lora.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
        return float(cfg["lora_alpha"]) / float(cfg["r"])
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def lora_deltas(loras: Sequence[tuple[LoraFile, float]], weights: Mapping[str, WeightRef],
                warn: Callable[[str], None], architecture: str = "Wan DiT",
                only: Collection[str] | None = None, dry: bool = False) -> dict[str, np.ndarray]:
    """diffusers parameter -> summed float32 delta, in the parameter's own (torch) layout and shape.

    Keys naming no module of this graph are reported once per file, by name (warn); a file none of whose
    keys names a module of this graph, or whose shapes do not fit it, is refused (UsageError).
    only: compute the deltas of these parameters alone (one step-caching piece of the graph); keys of
    the graph's other parameters are neither computed nor reported.
    dry: the same checks (keys, ranks, shapes against `weights`' shapes) without computing any delta (no
    product, no memory): returns {}. Only WeightRef.shape and .transposed are read."""
    total: dict[str, np.ndarray] = {}
    for lora, strength in loras:
        groups: dict[str, dict[str, tuple[CanonicalKey, np.ndarray]]] = defaultdict(dict)
        unknown, elsewhere = [], []
        matched = 0
        for key, value in lora.tensors.items():
            ck = canonical_key(key)
            if ck is None:
                unknown.append(key)
            elif ck.param not in weights:
                elsewhere.append(key)
            else:
                matched += 1
                if only is None or ck.param in only:
                    groups[ck.module if ck.kind in ("A", "B", "alpha") else ck.param][ck.kind] = (ck, value)
        if not matched:
            example = next(iter(lora.tensors), "(none)")
            raise UsageError(f"{lora.named} is not a LoRA for this {architecture}: none of its "
                             f"{len(lora.tensors)} keys names one of its modules (e.g. {example[:80]}); "
                             f"use a LoRA made for this model")
        skipped = unknown + elsewhere
        if skipped:
            shown = ", ".join(sorted(skipped)[:4])
            warn(f"LoRA {Path(lora.path).name}: {len(skipped)} key(s) match nothing in this model and were "
                 f"skipped: {shown}{' ...' if len(skipped) > 4 else ''}")
        file_scale = _file_alpha_scale(lora)
        for unit, parts in groups.items():
            for param, delta in _unit_deltas(lora, unit, parts, file_scale, weights, dry):
                total[param] = total[param] + strength * delta if param in total else strength * delta
    return total


def _unit_deltas(lora: LoraFile, unit: str, parts: dict[str, tuple[CanonicalKey, np.ndarray]],
                 file_scale: float | None, weights: Mapping[str, WeightRef],
                 dry: bool = False) -> list[tuple[str, np.ndarray]]:
    out = []
    if "A" in parts or "B" in parts:
        if not ("A" in parts and "B" in parts):
            raise UsageError(f"{lora.named}: {unit} has lora_{'up/B' if 'A' in parts else 'down/A'} "
                             f"missing; the file is incomplete")
        (ck, a), (_, b) = parts["A"], parts["B"]
        rank = a.shape[0]
        if b.ndim < 2 or int(np.prod(b.shape[1:])) != rank:
            raise UsageError(f"{lora.named}: {unit} has lora_down/A rank {rank} (shape {list(a.shape)}) but "
                             f"lora_up/B shape {list(b.shape)}; the ranks must match: the file is damaged or "
                             f"not a LoRA, use another copy")
        if "alpha" in parts:
            alpha = parts["alpha"][1]
            if alpha.size != 1:
                raise UsageError(f"{lora.named}: {unit}.alpha has shape {list(alpha.shape)}, not one number; "
                                 f"the file is damaged or not a LoRA, use another copy")
            scale = float(alpha.reshape(-1)[0]) / rank
        else:
            scale = file_scale if file_scale is not None else 1.0
        if dry:  # the product's shape, [out, prod(in, k...)], is all a check needs
            _fits(lora, ck.param, b.shape[0] * int(np.prod(a.shape[1:])), (b.shape[0], *a.shape[1:]), weights)
        else:  # conv LoRAs ([r, in, k...] / [out, r, 1...]) flatten to matrices
            delta = b.reshape(b.shape[0], -1) @ a.reshape(rank, -1)
            out.append((ck.param, np.float32(scale) * _shaped(lora, ck.param, delta, weights)))
    for kind in ("diff", "diff_b"):
        if kind in parts:
            ck, d = parts[kind]
            if dry:
                _fits(lora, ck.param, d.size, d.shape, weights)
            else:
                out.append((ck.param, _shaped(lora, ck.param, d, weights)))
    return out


def _fits(lora: LoraFile, param: str, size: int, shape: tuple[int, ...],
          weights: Mapping[str, WeightRef]) -> tuple[int, ...]:
    """The parameter's torch shape, if a delta of `size` elements (`shape`, for the message) fits it."""
    ref = weights[param]
    want = tuple(ref.shape[::-1]) if ref.transposed else tuple(ref.shape)
    if size != int(np.prod(want)):
        raise UsageError(f"{lora.named} does not fit this model: {param} needs {list(want)}, the LoRA gives "
                         f"{list(shape)} (a LoRA for another model size); use one made for this model")
    return want


def _shaped(lora: LoraFile, param: str, delta: np.ndarray, weights: Mapping[str, WeightRef]) -> np.ndarray:
    want = _fits(lora, param, delta.size, delta.shape, weights)
    return np.asarray(delta, dtype=np.float32).reshape(want)


# A LoRA that moves a weight by more than this many times the weight's own largest value (at least 1.0) is
# damaged (a lora_up scaled by 1e30) or far too strong: real LoRAs' deltas stay within the weights' scale.
# Such a DiT makes NaN/Inf at the first step; refused at the merge, naming the file.
MAX_DELTA_RATIO = 1e4


def merge_into(deltas: Mapping[str, np.ndarray], weights: Mapping[str, WeightRef],
               base: Callable[[str], np.ndarray], culprit: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
    """ONNX initializer name -> W0 + delta, in the initializer's stored layout (transposed Linear weights
    transposed back) and dtype (bf16 as uint16 bits). `base(initializer)` returns the stored base array.
    A merged weight that is not finite in its dtype, or a delta over MAX_DELTA_RATIO x the weight's scale,
    raises UsageError naming `culprit(param)` (the LoRA files and strengths that touch it, culprit_of)."""
    out = {}
    for param, delta in deltas.items():
        ref = weights[param]
        w0 = base(ref.initializer)
        d = delta.T if ref.transposed else delta
        w0_f32 = bf16_to_f32(w0) if ref.dtype == "bfloat16" else w0.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below and refused in one line
            merged = w0_f32 + d.reshape(w0.shape)
            out[ref.initializer] = f32_to_bf16(merged) if ref.dtype == "bfloat16" else merged.astype(w0.dtype)
        stored = bf16_to_f32(out[ref.initializer]) if ref.dtype == "bfloat16" else out[ref.initializer]
        peak = float(np.abs(d).max()) if d.size else 0.0
        scale = max(float(np.abs(w0_f32).max()) if w0.size else 0.0, 1.0)
        if not np.isfinite(stored).all() or peak > MAX_DELTA_RATIO * scale:
            who = culprit(param) if culprit is not None else "the LoRA"
            what = (f"non-finite in {ref.dtype}" if not np.isfinite(stored).all()
                    else f"change by up to {peak:.3g}, {peak / scale:.3g}x its scale")
            raise UsageError(f"{who} would make the DiT weight {param} {what}; the DiT would produce NaN/Inf: "
                             f"lower the strength, or use another file (this one may be damaged)")
    return out


def culprit_of(loras: Sequence[tuple[LoraFile, float]], weights: Mapping[str, WeightRef]) -> Callable[[str], str]:
    """param -> the LoRA file (as its messages name it) and strength whose own delta of that parameter is
    the largest (non-finite counts as largest): the one to lower or replace."""
    def culprit(param: str) -> str:
        def peak(item: tuple[LoraFile, float]) -> float:
            with np.errstate(over="ignore", invalid="ignore"):
                d = lora_deltas([item], weights, lambda _: None, only={param}).get(param)
                return 0.0 if d is None else float(np.nan_to_num(np.abs(d), nan=np.inf).max(initial=0.0))
        f, s = max(loras, key=peak)
        return f"{f.named} (strength {s:g})"
    return culprit


_STRENGTH = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_lora_arg(value: str, flag: str | None = None) -> tuple[str, float]:
    """"FILE[:STRENGTH]" -> (FILE, strength); strength defaults to 1.0. A value without ':' is a path; so is
    an existing file whose name holds ':'. Otherwise the text after the last ':' must be a finite number.
    flag: how messages name the value (default: the caller's spelling of a LoRA, vidrt.errors.arg)."""
    flag = flag or arg("lora")
    path, colon, tail = value.rpartition(":")
    if not colon or (not _STRENGTH.match(tail) and Path(value).is_file()):
        path, tail = value, ""
    if not path:
        raise UsageError(f"{flag} {value!r} is not FILE[:STRENGTH]; write it like {flag} style.safetensors:0.8")
    if colon and tail and not _STRENGTH.match(tail) or colon and not tail and path != value:
        raise UsageError(f"{flag} {value}: strength {tail!r} is not a finite number; the form is FILE[:STRENGTH], "
                         f"e.g. {flag} style.safetensors:0.8")
    strength = float(tail) if tail else 1.0
    check_strength(strength, f"{flag} {value}")
    return path, strength


def check_strength(strength: float, where: str) -> None:
    """A LoRA strength must be a finite number in -10..10 (1.0 = as trained); NaN would poison the DiT."""
    if not -10.0 <= strength <= 10.0:  # also false for NaN
        raise UsageError(f"{where}: strength {strength} is not a finite number in -10..10; use e.g. 0.8 "
                         f"(1.0 = as trained)")

"""Reading weight files lazily: safetensors headers / shards / index, and .pth via mmap.

Every failure becomes one-line `PackageError` naming the file. Nothing here knows about Wan.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from vidrt.errors import PackageError
from vidrt.export.keymaps import View


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    file: Path
    dtype: str = ""  # as the file names it: safetensors "F32"/"BF16"/"I64"..., .pth "float32"...; "" unknown


# Stored dtypes a floating-point weight may come in (cast to the export precision when read). Anything
# else (integers, bool, fp8 without its scales) is a different or damaged file, refused before export.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16"})


@dataclass(frozen=True)
class WeightFiles:
    """One component's weights: safetensors shards (in index order) or one .pth."""

    files: tuple[Path, ...]
    fmt: str  # "safetensors" | "pth"
    index: Path | None = None

    @property
    def label(self) -> Path:
        """The file to name in messages: the index if sharded, else the single file."""
        return self.index or self.files[0]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; the checkpoint folder is incomplete") from None
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: unreadable JSON ({exc}); re-download this file") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object; re-download this file")
    return data


def safetensors_files(folder: Path, stem: str) -> WeightFiles | None:
    """`<stem>.safetensors`, or the shards named by `<stem>.safetensors.index.json`; None if neither."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PackageError(f"{index}: no 'weight_map'; re-download this file")
        names = list(dict.fromkeys(weight_map.values()))  # shard order of first appearance
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise PackageError(f"{index}: names shard(s) that are missing: {', '.join(missing)}; "
                               "download them into " + str(folder))
        return WeightFiles(tuple(folder / n for n in names), "safetensors", index)
    if single.is_file():
        return WeightFiles((single,), "safetensors")
    return None


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse the header only (8-byte little-endian length + JSON) and check the file is long
    enough for every tensor it declares, so a truncated download fails here, not mid-export."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; the checkpoint folder is incomplete") from None
    except (OSError, ValueError, struct.error) as exc:
        raise PackageError(f"{path}: not a valid safetensors file ({exc}); re-download it") from None
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = TensorInfo(tuple(int(d) for d in meta["shape"]), path, str(meta.get("dtype", "")))
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise PackageError(f"{path}: malformed safetensors header entry {name!r}; re-download it") from None
    if 8 + n + end > size:
        raise PackageError(f"{path}: truncated ({size} bytes, header needs {8 + n + end}); re-download it")
    return out


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """.pth files load ONLY as weights (no pickled code) and memory-mapped (lazy)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file: still weights only
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; the checkpoint folder is incomplete") from None
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, i.e. running the file's code: never do that here
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise PackageError(f"{path}: holds pickled Python objects{what}, not only tensors; vidrt loads .pth files as "
                           f"weights only and refused it (nothing in it ran); get the file from the official source "
                           f"or convert it to .safetensors") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... on damaged files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch puts ANSI bold in some messages
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise PackageError(f"{path}: cannot be read as a weights-only torch file ({first}); re-download it") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PackageError(f"{path}: not a state dict of tensors; re-download it")
    return sd


def shapes(wf: WeightFiles) -> dict[str, TensorInfo]:
    """Tensor name -> shape (+ which file holds it), reading headers only."""
    if wf.fmt == "pth":
        return {k: TensorInfo(tuple(v.shape), wf.files[0], str(v.dtype).removeprefix("torch."))
                for k, v in _load_pth(wf.files[0]).items()}
    out: dict[str, TensorInfo] = {}
    for f in wf.files:
        out.update(safetensors_header(f))
    return out


def load(wf: WeightFiles, names: dict[str, str], dtype: torch.dtype | None,
         views: Mapping[str, View] | None = None) -> dict[str, torch.Tensor]:
    """{new_name: source_name} -> {new_name: tensor}. Each source tensor is read once (safe_open
    copies it out of the mmap; .pth tensors stay mmapped) and cast to `dtype` if given (ties share it).
    views: new names that are a part of their source tensor (keymaps.View: a chunk, squeezed dims)."""
    by_source: dict[str, torch.Tensor] = {}
    wanted = set(names.values())

    def cast(t: torch.Tensor) -> torch.Tensor:  # one tensor at a time: peak = model + one tensor
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    if wf.fmt == "pth":
        sd = _load_pth(wf.files[0])
        for k in wanted:
            by_source[k] = cast(sd[k])
    else:
        from safetensors import SafetensorError, safe_open

        for f in wf.files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for k in st.keys():
                        if k in wanted:
                            by_source[k] = cast(st.get_tensor(k))
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise PackageError(f"{f}: cannot be read ({exc}); re-download it") from None
    views = views or {}
    return {new: view_of(by_source[src], views[new]) if new in views else by_source[src]
            for new, src in names.items()}


def view_of(t: torch.Tensor, view: View) -> torch.Tensor:
    """The part of a stored tensor a keymaps.View names (a view, no copy)."""
    t = t.reshape(view.shape(tuple(t.shape))) if view.chunks == 1 else t.reshape(t.shape[view.drop:])
    return t.chunk(view.chunks, dim=0)[view.index] if view.chunks > 1 else t


def stored(wf: WeightFiles, names: dict[str, str]) -> dict[str, Callable[[], torch.Tensor]]:
    """{new_name: source_name} -> {new_name: reader}: each reader returns that tensor from the file when
    called, so an export can stream a 14B model into its ONNX data file one tensor at a time instead of
    holding it all (plus cast copies) in RAM. .pth tensors are mmapped; safetensors are read per call."""
    if wf.fmt == "pth":
        sd = _load_pth(wf.files[0])
        return {new: partial(_identity, sd[src]) for new, src in names.items()}
    where = {k: info.file for f in wf.files for k, info in safetensors_header(f).items()}
    return {new: partial(_read_safetensor, where[src], src) for new, src in names.items()}


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _read_safetensor(file: Path, key: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as st:
            return st.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise PackageError(f"{file}: cannot be read ({exc}); re-download it") from None

"""LoRA at load time: a weight transform, never a graph change (DESIGN.md §9, fast_paths.md A).

    merger = LoraMerger(package, manifest, warn)
    key, merged = merger.merged("dit", (LoraRef("style.safetensors", 0.8),))  # initializer -> array
    # ONNX Runtime: a session with those initializers (add_external_initializers); TensorRT: a refit

The base weights stay untouched on disk: every merge starts from them (memory-mapped from the DiT's
external-data file at the offsets the manifest records), so changing a strength recomputes W0 + s * dW.
Files are read once per version (path, size, mtime, inode: a file replaced under the same name is read
again, its old contents dropped); the merged arrays are not kept (the pipeline keeps the sessions made from them,
per (expert, LoRA set), and ONNX Runtime copies them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from vidrt.errors import PackageError, UsageError, arg, command_or, flags_shown, python_caller
from vidrt.lora.merge import (
    LoraFile,
    check_strength,
    culprit_of,
    lora_deltas,
    merge_into,
    parse_lora_arg,
    read_lora,
    read_lora_header,
)
from vidrt.package.manifest import Manifest, WeightRef, artifact_path, sha256_file
from vidrt.package.recipes import LoraRef

__all__ = ["SetKey", "LoraMerger", "LoraRef", "LoraFile", "read_lora", "read_lora_header", "lora_deltas",
           "merge_into", "parse_lora_arg",
           "check_strength",
           "base_reader", "as_lora_refs", "superseded", "first_twin", "given_twice", "refuse_twins", "check_expert"]

Version = tuple[str, int, int, int]  # (resolved path, size in bytes, mtime in ns, inode); -1s: unreadable
SetKey = tuple[tuple[Version, float], ...]  # each merged file's version and strength


def version_of(resolved: str) -> Version:
    """A file's identity for the caches: a file replaced or rewritten under the same name is another one."""
    try:
        st = Path(resolved).stat()
    except OSError:
        return (resolved, -1, -1, -1)
    return (resolved, st.st_size, st.st_mtime_ns, st.st_ino)


def superseded(old: SetKey, new: SetKey) -> bool:
    """Does `new` hold a newer version of a file `old` merged (its engine can never be wanted again)?"""
    now = {v[0]: v for v, _ in new}
    return any(v[0] in now and now[v[0]] != v for v, _ in old)


def as_lora_refs(loras: Sequence[LoraRef | tuple[str, float] | str] | None) -> tuple[LoraRef, ...]:
    """LoraRef, (path, strength), "FILE[:STRENGTH]" -> LoraRef (every expert); a strength that is not a
    finite number in -10..10 is refused (UsageError)."""
    out = []
    for item in loras or ():
        if isinstance(item, LoraRef):
            out.append(item)
        elif isinstance(item, (str, Path)):
            out.append(LoraRef(*parse_lora_arg(str(item), "loras")))
        elif (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path))
              and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            out.append(LoraRef(str(item[0]), float(item[1])))
        else:
            raise UsageError(f"loras: {item!r:.60} is not (path, strength); write loras=[('style.safetensors', 0.8)]")
        check_strength(out[-1].strength, out[-1].named)
    return tuple(out)


def _overlap(a: str | None, b: str | None) -> bool:
    """Do two LoRAs' experts meet (None = every expert)?"""
    return a is None or b is None or a == b


def first_twin(ref: LoraRef, earlier: Sequence[LoraRef], size: Callable[[str], int | None],
               sha256: Callable[[str], str]) -> int | None:
    """The index in `earlier` of the first LoRA that is the same file as `ref` (the same sha256; hashed only
    when the sizes match) for an expert `ref` is also for; None if there is none or `ref` is unreadable.
    The one rule for a LoRA given twice: `vidrt run` / Pipeline / batch / serve (LoraMerger.applied) and
    `vidrt export --lora` (refuse_twins)."""
    n = size(ref.path)
    if n is None:  # unreadable: read_lora names the problem later
        return None
    return next((j for j, other in enumerate(earlier) if size(other.path) == n and _overlap(other.expert, ref.expert)
                 and sha256(other.path) == sha256(ref.path)), None)


def given_twice(ref: LoraRef, first: LoraRef) -> UsageError:
    """The refusal of a LoRA file given twice for the same expert (docs/errors.md 14t2)."""
    return UsageError(f"{ref.named} is the same file as {first.named}; a LoRA given twice would be merged "
                      f"twice: give it once, with the strength you want")


def check_expert(ref: LoraRef, experts: Sequence[str]) -> None:
    """Refuse (UsageError) a LoRA given for an expert the model does not have (`--lora-high-noise` on a
    one-denoiser model), naming the form that gives it for every expert in the caller's spelling:
    `--lora FILE`, `loras=[('FILE', 1.0)]`, a job's `loras` item without its `dit_high=`.
    One message for `vidrt run` / Python / batch / serve (LoraMerger.for_expert) and `vidrt export`."""
    if ref.expert is not None and ref.expert not in experts:
        fix = f"give it as {arg('lora', ref.path)}" if flags_shown() or python_caller() else \
            f"name it in {arg('lora')} without \"{ref.expert}=\""
        raise UsageError(f"{ref.named} is for expert {ref.expert}, this model has {', '.join(experts)}; a LoRA on a "
                         f"one-denoiser model is for every expert: {fix}")


def _file_size(path: str) -> int | None:
    try:
        return Path(path).expanduser().stat().st_size
    except OSError:
        return None


def refuse_twins(refs: Sequence[LoraRef]) -> None:
    """Refuse (UsageError, given_twice) a LoRA file given twice for the same expert among user paths, each
    hashed at most once: `vidrt export --lora a --lora a:0.5` as `vidrt run` refuses it."""
    hashes: dict[str, str] = {}

    def sha256(path: str) -> str:
        if path not in hashes:
            hashes[path] = sha256_file(Path(path).expanduser())
        return hashes[path]

    for i, ref in enumerate(refs):
        twin = first_twin(ref, refs[:i], _file_size, sha256)
        if twin is not None:
            raise given_twice(ref, refs[twin])


def base_reader(data_file: Path, weights: dict[str, WeightRef]) -> Callable[[str], np.ndarray]:
    """initializer name -> its stored base array, memory-mapped from the external-data file (read-only)."""
    by_name = {ref.initializer: ref for ref in weights.values()}
    mapped = np.memmap(data_file, dtype=np.uint8, mode="r")

    def read(initializer: str) -> np.ndarray:
        ref = by_name[initializer]
        dtype = np.uint16 if ref.dtype == "bfloat16" else np.dtype(ref.dtype)
        raw = mapped[ref.offset:ref.offset + ref.length]
        return np.frombuffer(raw, dtype=dtype).reshape(ref.shape)

    return read


class LoraMerger:
    """Merged DiT initializers per (expert, LoRA set), for one package."""

    def __init__(self, package: Path, manifest: Manifest, warn: Callable[[str], None]) -> None:
        self.package, self.manifest = package, manifest
        self._warn_to = warn
        self._warned: set[str] = set()
        self._files: dict[str, tuple[Version, LoraFile]] = {}  # resolved path -> its last version read
        self._hashes: dict[str, tuple[Version, str]] = {}  # resolved path -> (version, sha256)
        self.last_seconds = 0.0  # time of the last merge that was not cached
        self.last_bytes = 0  # bytes of merged tensors it produced

    def warn(self, message: str) -> None:
        """Each distinct warning once: the check at load and the merges into an expert's step-caching
        pieces meet the same skipped keys again."""
        if message not in self._warned:
            self._warned.add(message)
            self._warn_to(message)

    def applied(self, loras: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
        """The LoRAs a run merges, from those it asks for (the pipeline's, the recipe's, the request's), each
        file identified by its sha256 (hashed only when its size matches another's):
        - a file baked into the package (`vidrt export --lora`, manifest `baked_loras`) for the same expert
          is not merged again: one line says so (its weights are in the package already);
        - the recipe's own LoRA file given again (`--recipe fast --lora .../fast_lora.safetensors:0.5`) is
          merged once, at the strength the user gave (a flag overrides the recipe's field): one line says so;
        - any other file given twice for the same expert is refused (UsageError): give it once.
        Strength-0 refs take part like any other (`--lora fast_lora.safetensors:0` turns the recipe's LoRA
        off) and stay in the result at strength 0, so the records reproduce the clip; nothing is merged
        from them (for_expert).
        The result starts with the package's baked LoRAs as records (LoraRef.baked: the file's name, the
        strength it was baked at), whatever was asked, since the clip is made with them; baked records
        given back in are dropped and re-added, so applied(applied(x)) == applied(x)."""
        shipped = {a.file for a in self.manifest.loras}
        refs = [r for r in loras if not r.baked]
        keep: list[int] = []
        for i, ref in enumerate(refs):
            size = self._size(ref.path)
            baked = None if size is None else next(
                (b for b in self.manifest.baked_loras if b.size_bytes == size
                 and _overlap(b.expert, ref.expert) and b.sha256 == self._sha256(ref.path)), None)
            if baked is not None:
                self.warn(f"{ref.named} (strength {ref.strength:g}) is already baked into this package at strength "
                          f"{baked.strength:g} (`vidrt export --lora`, see `vidrt info`); not merged again")
                continue
            found = first_twin(ref, [refs[j] for j in keep], self._size, self._sha256)
            if found is None:
                keep.append(i)
                continue
            twin = keep[found]
            first = refs[twin]
            if first.path in shipped or ref.path in shipped:  # the recipe's file, given again by the user
                mine, recipe = (ref, first) if first.path in shipped else (first, ref)
                self.warn(f"{mine.named} is the recipe's own LoRA {Path(recipe.path).name}; " + (
                    f"not merged (strength 0 replaces the recipe's {recipe.strength:g})" if mine.strength == 0.0 else
                    f"merged once, at strength {mine.strength:g} (not {recipe.strength:g} + {mine.strength:g})"))
                if mine is ref:
                    keep[keep.index(twin)] = i
                continue
            raise given_twice(ref, first)
        return self.baked() + tuple(refs[i] for i in keep)

    def baked(self) -> tuple[LoraRef, ...]:
        """The LoRAs baked into the package (manifest baked_loras), as records (LoraRef.baked)."""
        return tuple(LoraRef(b.file, b.strength, b.expert, baked=True) for b in self.manifest.baked_loras)

    def _size(self, path: str) -> int | None:
        try:
            return Path(self._resolve(path)).stat().st_size
        except OSError:
            return None

    def _sha256(self, path: str) -> str:
        """A file's sha256, the package's own from the manifest, others hashed once per version (the last
        version of each path kept)."""
        for art in self.manifest.loras:
            if art.file == path:
                return art.sha256
        version = version_of(self._resolve(path))
        known = self._hashes.get(version[0])
        if known is None or known[0] != version:
            known = self._hashes[version[0]] = (version, sha256_file(Path(version[0])))
        return known[1]

    def expert_of(self, name: str) -> str:
        """The DiT expert a component belongs to: `name` itself, or a step-caching piece's expert
        ("dit.blocks_rest" -> "dit"; vidrt.caching runs the pieces, export/dit_split.py cuts them)."""
        head, _, piece = name.partition(".")
        return head if piece and head in self.manifest.model.experts else name

    def for_expert(self, expert: str, loras: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
        expert = self.expert_of(expert)
        experts = self.manifest.model.experts
        for ref in loras:
            check_strength(ref.strength, ref.named)
            check_expert(ref, experts)
        return tuple(r for r in loras if r.expert in (None, expert) and r.strength != 0.0 and not r.baked)

    def key(self, expert: str, loras: Sequence[LoraRef]) -> SetKey:
        """The LoRA set merged into `expert`: each file's version (a file rewritten under the same name is
        another set) and strength."""
        return tuple((version_of(self._resolve(r.path)), float(r.strength)) for r in self.for_expert(expert, loras))

    def _files_of(self, expert: str, loras: Sequence[LoraRef]) -> tuple[SetKey, list[tuple[LoraFile, float]]]:
        """The set key and its files, each named in messages as its LoraRef's caller named it."""
        refs = self.for_expert(expert, loras)
        key = tuple((version_of(self._resolve(r.path)), float(r.strength)) for r in refs)
        return key, [(self._read(version, ref.named), strength)
                     for (version, strength), ref in zip(key, refs, strict=True)]

    def check(self, expert: str, loras: Sequence[LoraRef]) -> None:
        """Read every file that applies to `expert` and check its keys and shapes against the DiT (no merge,
        no product computed: lora_deltas(dry=True))."""
        key, files = self._files_of(expert, loras)
        if key:
            lora_deltas(files, self.weights(expert), self.warn, dry=True)

    def check_header(self, expert: str, ref: LoraRef) -> None:
        """One file's keys and shapes against `expert`'s DiT from its safetensors header alone (the tensor
        bytes are not read: read_lora_header): what a server checks before it queues a job."""
        if self.for_expert(expert, (ref,)):
            path = self._resolve(ref.path)
            lora_deltas([(read_lora_header(path, ref.label), ref.strength)], self.weights(expert), self.warn,
                        dry=True)

    def _resolve(self, path: str) -> str:
        """A file the package ships (a recipe's LoRA) by its package-relative name, else a user path."""
        shipped = {a.file for a in self.manifest.loras}
        return str(artifact_path(self.package, path)) if path in shipped else str(Path(path).expanduser().resolve())

    def _read(self, version: Version, label: str | None = None) -> LoraFile:
        """The file, read once per version (a new version of a path replaces the old one: a long-lived
        server worker keeps one per file); `label` (LoraRef.label) names it in this call's messages."""
        path = version[0]
        known = self._files.get(path)
        if known is None or known[0] != version:
            known = self._files[path] = (version, read_lora(path, label))
        return replace(known[1], label=label or f"LoRA {path}")

    def weights(self, expert: str) -> dict[str, WeightRef]:
        comp = self.manifest.components[expert]
        if not comp.weights:
            raise PackageError(command_or(f"{self.package} was exported", "this server's model package was exported")
                               + " before vidrt recorded its DiT weight layout, so LoRAs cannot be applied to it; "
                               + command_or("re-export it (`vidrt export`)", f"leave {arg('lora')} out"))
        if comp.precision == "fp8":
            raise UsageError("LoRAs cannot be merged into an FP8-quantised DiT (its weights are quantised); "
                             + command_or("bake the LoRA in before quantising (`vidrt export --lora`)",
                                          f"leave {arg('lora')} out (the server's operator can bake a LoRA in "
                                          "when exporting)"))
        return comp.weights

    def _piece_weights(self, piece: str) -> dict[str, WeightRef]:
        comp = self.manifest.components[piece]
        if not comp.weights:
            raise PackageError(command_or(f"{self.package}", "this server's model package") + ": its step-caching "
                               "pieces were cut before vidrt recorded their weights, so LoRAs cannot be merged into "
                               + command_or(f"them; re-cut them with `vidrt cache split {self.package}`, or run "
                                            f"without {arg('cache')}", f"them; leave {arg('cache')} out"))
        return comp.weights

    def base(self, expert: str) -> Callable[[str], np.ndarray]:
        comp = self.manifest.components[expert]
        assert comp.artifact.data_file is not None
        return base_reader(artifact_path(self.package, comp.artifact.data_file), self.weights(expert))

    def merged(self, expert: str, loras: Sequence[LoraRef]) -> tuple[SetKey, dict[str, np.ndarray]]:
        """(set key, initializer -> merged array); an empty dict when no LoRA applies to this expert.
        `expert` may name a step-caching piece ("dit.block0"): then only the initializers that piece
        holds (its manifest `weights`; ONNX Runtime refuses one the graph lacks), merged exactly as for
        the whole graph. A piece no LoRA key touches gets an empty dict. Raises PackageError for pieces
        cut before vidrt recorded their weights."""
        key, files = self._files_of(expert, loras)
        if not key:
            return key, {}
        t0 = time.perf_counter()
        whole = self.expert_of(expert)
        weights = self.weights(whole)
        own = weights if whole == expert else self._piece_weights(expert)
        deltas = lora_deltas(files, weights, self.warn, only=None if own is weights else set(own))
        merged = merge_into(deltas, own, self.base(whole), culprit_of(files, weights))
        self.last_seconds = time.perf_counter() - t0
        self.last_bytes = sum(a.nbytes for a in merged.values())
        return key, merged

"""What a package carries besides its graphs: the checkpoint's own recipes and their LoRA files, and LoRAs
baked into the DiT at export (`vidrt export --lora`).

recipes.json (optional, beside a checkpoint's model_index.json): a list of `vidrt.package.recipes.Recipe`
objects as JSON; a LoRA slot's `file` names a file in the checkpoint folder, copied into the package
folder (top level: the wheel's package data is one level deep) and listed (hashed) in the manifest.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vidrt.errors import PackageError
from vidrt.lora import LoraRef, base_reader, check_expert, lora_deltas, merge_into, read_lora, refuse_twins
from vidrt.lora.merge import culprit_of
from vidrt.package.manifest import Artifact, BakedLora, Component, WeightRef, make_artifact, sha256_file
from vidrt.package.recipes import Recipe
from vidrt.package.registry import from_dict

if TYPE_CHECKING:
    from vidrt.export.checkpoints import Checkpoint

RECIPES_FILE = "recipes.json"


def package_recipes(model_dir: Path, out: Path) -> tuple[tuple[Recipe, ...], tuple[Artifact, ...]]:
    """The checkpoint's recipes (their LoRA files copied into `out`) and the copied files' artifacts."""
    path = model_dir / RECIPES_FILE
    if not path.is_file():
        return (), ()
    try:
        recipes = tuple(from_dict(Recipe, r) for r in json.loads(path.read_text("utf-8")))
    except (ValueError, TypeError, KeyError) as exc:
        raise PackageError(f"{path} is not a list of recipes ({str(exc)[:120]})") from None
    artifacts, fixed = {}, []
    for r in recipes:
        slots = []
        for slot in r.loras:
            if slot.file is None:
                slots.append(slot)
                continue
            src = model_dir / slot.file
            if not src.is_file():
                raise PackageError(f"{path}: recipe {r.name!r} names {slot.file}, which is not in {model_dir}")
            name = Path(slot.file).name
            shutil.copyfile(src, out / name)
            artifacts[name] = make_artifact(out, name)
            slots.append(replace(slot, file=name))
        fixed.append(replace(r, loras=tuple(slots)))
    return tuple(fixed), tuple(artifacts.values())


def bake_loras(out: Path, components: Mapping[str, Component], expert: str, loras: Sequence[LoraRef],
               warn: object = print) -> dict[str, Component]:
    """Merge LoRAs into one DiT expert's external-data file, in place (W0 + sum s * dW, written at the
    recorded offsets), and re-hash every component that shares that file (the step-caching pieces point
    at the whole graph's data file: vidrt.export.dit_split). For engines that cannot be refitted, or
    plain convenience.

    components: the package's components by name; returns only the ones whose artifact changed."""
    comp = components[expert]
    refs = [r for r in loras if r.expert in (None, comp.name)]
    if not refs:
        return {}
    assert comp.artifact.data_file is not None
    data = out / comp.artifact.data_file
    files = [(read_lora(r.path, r.label), r.strength) for r in refs]
    deltas = lora_deltas(files, comp.weights, warn)  # type: ignore[arg-type]
    merged = merge_into(deltas, comp.weights, base_reader(data, comp.weights), culprit_of(files, comp.weights))
    by_name = {ref.initializer: ref for ref in comp.weights.values()}
    with open(data, "r+b") as f:
        for name, array in merged.items():
            f.seek(by_name[name].offset)
            f.write(array.tobytes())
    return {c.name: replace(c, artifact=make_artifact(out, c.artifact.file, c.artifact.data_file))
            for c in components.values() if c.artifact.data_file == comp.artifact.data_file}


def baked_records(loras: Sequence[LoraRef], experts: Sequence[str]) -> tuple[BakedLora, ...]:
    """The manifest's record of the LoRAs `bake_loras` merged (file name, sha256, size, strength, expert):
    `vidrt info` shows them and the runtime never merges the same file into the same expert again."""
    return tuple(BakedLora(Path(r.path).name, sha256_file(Path(r.path)), Path(r.path).stat().st_size,
                           float(r.strength), r.expert) for r in loras
                 if r.strength != 0.0 and r.expert in (None, *experts))


def check_loras(ckpt: Checkpoint, loras: Sequence[LoraRef]) -> None:
    """Every LoRA to bake, read and checked against the checkpoint's DiT (keys, ranks, shapes: from the
    safetensors headers, no tensor of the checkpoint read, no delta computed) before any export stage, so a
    LoRA for another architecture or size, or one file given twice, is a one-line UsageError in seconds, not
    after the text encoder."""
    experts = ckpt.spec.experts
    refuse_twins(loras)  # a file given twice (by sha256) for the same expert: refused as `vidrt run` refuses it
    for ref in loras:
        check_expert(ref, experts)  # `--lora-high-noise` on a one-denoiser model: use --lora
        lora = read_lora(ref.path, ref.label)  # missing, damaged (NaN/Inf, truncated, not safetensors)
        for expert in experts:
            if ref.expert in (None, expert):
                shapes = ckpt.transformer_shapes(expert)
                layout = {k: WeightRef(k, False, 0, 0, "float32", shape) for k, shape in shapes.items()}
                # keys that match nothing are reported once, when the LoRA is baked
                lora_deltas([(lora, ref.strength)], layout, lambda _: None, dry=True)

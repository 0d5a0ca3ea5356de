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

from vidrt.errors import PackageError
from vidrt.lora import LoraRef, base_reader, lora_deltas, merge_into, read_lora
from vidrt.package.manifest import Artifact, Component, make_artifact
from vidrt.package.recipes import Recipe
from vidrt.package.registry import from_dict

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
    deltas = lora_deltas([(read_lora(r.path, r.label), r.strength) for r in refs], comp.weights, warn)  # type: ignore[arg-type]
    merged = merge_into(deltas, comp.weights, base_reader(data, comp.weights))
    by_name = {ref.initializer: ref for ref in comp.weights.values()}
    with open(data, "r+b") as f:
        for name, array in merged.items():
            f.seek(by_name[name].offset)
            f.write(array.tobytes())
    return {c.name: replace(c, artifact=make_artifact(out, c.artifact.file, c.artifact.data_file))
            for c in components.values() if c.artifact.data_file == comp.artifact.data_file}

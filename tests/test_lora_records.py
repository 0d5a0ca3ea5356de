"""Every LoRA a clip was made with is in its records (issue 12 user report): Result.settings, --stats-json
and the file's metadata list the pipeline's (`--lora`, Pipeline.load(loras=)), the recipe's and the
request's, with strength and expert; baked LoRAs are recorded in the package and never merged twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import vidrt
from safetensors.numpy import save_file

TINY = ["--size", "32x32", "--frames", "1", "-q"]  # the recipe sets the steps
Q = "diffusion_model.blocks.0.self_attn.q"  # a rank-4 LoRA for the bundled model's first block


def small_lora(path: Path, dim: int, value: float = 0.01) -> Path:
    save_file({f"{Q}.lora_down.weight": np.full((4, dim), value, np.float32),
               f"{Q}.lora_up.weight": np.ones((dim, 4), np.float32)}, str(path))
    return path


@pytest.fixture(scope="module")
def bundled():
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest

    package = default_package()
    if package is None:
        pytest.skip("this build ships no bundled model")
    return package, load_manifest(package, verify=False)


def test_run_records_every_lora_it_applies(bundled, tmp_path, capsys):
    """`vidrt run --recipe fast --lora X:0.5`: the --lora file (first: it is merged at load) and the
    recipe's, in --stats-json and the file's metadata; the Python API's Result.settings the same."""
    from vidrt import Pipeline, Request
    from vidrt.video import read_metadata

    package, manifest = bundled
    style = small_lora(tmp_path / "style.safetensors", manifest.model.dit.dim)
    out, stats = tmp_path / "clip.mp4", tmp_path / "nr.json"
    code, err = vidrt(capsys, "run", "-p", "a red circle moving left", "--seed", "3", "--recipe", "fast",
                      "--lora", f"{style}:0.5", "--stats-json", stats, "-o", out, *TINY)
    assert code == 0, err
    recorded = [(Path(r["path"]).name, r["strength"], r["expert"])
                for r in json.loads(stats.read_text())["settings"]["loras"]]
    assert recorded == [("style.safetensors", 0.5, None), ("fast_lora.safetensors", 1.0, None)], recorded
    assert read_metadata(out)["loras"] == ["style.safetensors:0.5", "fast_lora.safetensors:1"]

    pipe = Pipeline.load(package, loras=[(str(style), 0.5)], warn=lambda _: None)
    result = pipe.run(Request(prompt="a red circle moving left", width=32, height=32, num_frames=1, steps=1,
                              seed=3))
    assert [(Path(r.path).name, r.strength) for r in result.settings.loras] == [("style.safetensors", 0.5)]

"""A checkpoint whose weights do not match its config (the Wan report: a TI2V-5B transformer file in a
Wan2.1 folder): every weight is checked against the model before any graph is written, the error
reaches the user as vidrt's own one line (exit 3), and the package folder is left as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_error, vidrt
from safetensors.torch import load_file, save_file
from tiny import TINY_VARIANT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _damaged(checkpoint: Path, dest: Path, change) -> Path:
    shutil.copytree(checkpoint, dest)
    f = dest / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    change(sd)
    save_file(sd, f)
    return dest


def _wider_proj_out(sd: dict[str, torch.Tensor]) -> None:  # 48 latent channels where the config says 16
    sd["proj_out.bias"] = torch.zeros(3 * sd["proj_out.bias"].shape[0])
    sd["proj_out.weight"] = torch.zeros(3 * sd["proj_out.weight"].shape[0], sd["proj_out.weight"].shape[1])


def _integer_weight(sd: dict[str, torch.Tensor]) -> None:
    sd["proj_out.weight"] = sd["proj_out.weight"].to(torch.int32)


@pytest.mark.parametrize("change, needles", [(_wider_proj_out, ("proj_out", "shape")),
                                             (_integer_weight, ("proj_out.weight", "I32"))],
                         ids=["shape", "dtype"])
def test_mismatched_weights_are_refused_before_any_graph(capsys, tiny_t2v_checkpoint, tiny_t2v_package, tmp_path,
                                                         change, needles):
    ckpt = _damaged(tiny_t2v_checkpoint, tmp_path / "ckpt", change)
    variant = TINY_VARIANT["t2v"]
    fresh = tmp_path / "fresh"  # a folder that does not exist yet: still does not afterwards
    assert_error(*vidrt(capsys, "export", "--model", ckpt, "--variant", variant, "--out", fresh), 3, *needles)
    assert not fresh.exists()

    previous = tmp_path / "previous"  # a good package from before: untouched, byte for byte
    shutil.copytree(tiny_t2v_package, previous)
    before = _snapshot(previous)
    assert_error(*vidrt(capsys, "export", "--model", ckpt, "--variant", variant, "--out", previous), 3, *needles)
    assert _snapshot(previous) == before


def test_an_error_inside_a_lazy_weight_reaches_the_user_as_itself(capsys, tiny_t2v_checkpoint, tmp_path,
                                                                   monkeypatch):
    """A weight that passes the header check but fails when read at save time (a file changed under the
    export): vidrt's PackageError, not onnx_ir's PassError wrapper as an internal error; nothing left."""
    from vidrt.errors import PackageError
    from vidrt.export import weights

    def fails(file, key):
        raise PackageError(f"{file}: cannot be read (changed while exporting); re-download it")

    monkeypatch.setattr(weights, "_read_safetensor", fails)
    out = tmp_path / "pkg"
    code, err = vidrt(capsys, "export", "--model", tiny_t2v_checkpoint, "--variant", TINY_VARIANT["t2v"],
                      "--out", out)
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # before it: the export's progress bar
    assert code == 3 and last.startswith("error: ") and "changed while exporting" in last, err
    assert "internal error" not in err and "Traceback" not in err
    assert not out.exists()

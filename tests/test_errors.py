"""Bad input, faults and unsafe files: one-line errors, an exit code per class, nothing lost, nothing
executed. One test (or parametrised case) per row of docs/errors.md.

CLI cases run `vidrt.cli.main` in this process; signals and killed exports run in subprocesses.
Every run uses the shared tiny package (tests/conftest.py) at 32x32, 1 frame, 1 step.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import SMALL, VIDRT, assert_error, copy_package, read_only_mount, rehash, temps, vidrt
from vidrt.export.package import LOCK_FILE
from vidrt.package.manifest import MANIFEST_NAME, load_manifest
from vidrt.video import read_metadata

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def pkg(tiny_t2v_package):
    return tiny_t2v_package


def run_args(package: Path, out: Path, *extra: str, prompt: str | None = "a cat walks on the beach") -> list[str]:
    args = ["run", "-m", str(package), "-o", str(out), *SMALL, *extra]
    return args + (["-p", prompt] if prompt is not None else [])


# ---- inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", " \n\t "])
def test_empty_prompt(capsys, pkg, tmp_path, prompt):
    out = tmp_path / "a.mp4"
    assert_error(*vidrt(capsys, *run_args(pkg, out, prompt=prompt)), 2, "prompt is empty", "--prompt")
    assert not out.exists() and temps(tmp_path) == []


def test_no_prompt_and_both_prompts(capsys, pkg, tmp_path):
    assert_error(*vidrt(capsys, *run_args(pkg, tmp_path / "a.mp4", prompt=None)), 2, "--prompt-file")
    f = tmp_path / "p.txt"
    f.write_text("a cat")
    assert_error(*vidrt(capsys, *run_args(pkg, tmp_path / "a.mp4", "--prompt-file", str(f))), 2, "not both")


def test_prompt_over_512_tokens_is_truncated_with_a_warning(capsys, pkg, tmp_path):
    out = tmp_path / "a.mp4"
    code, err = vidrt(capsys, *run_args(pkg, out, prompt=" ".join(["cat"] * 600)))
    assert code == 0, err
    assert "warning: the prompt is longer than 512 tokens; it was truncated" in err and "Traceback" not in err
    assert out.is_file()


@pytest.mark.parametrize("data, needle", [(b"a caf\xe9 at night", "not UTF-8"),  # latin-1
                                          (b"\xff\xfea\x00 \x00c\x00a\x00t\x00", "not UTF-8"),  # UTF-16
                                          (None, "does not exist")])
def test_prompt_file_bad_encoding_or_missing(capsys, pkg, tmp_path, data, needle):
    f = tmp_path / "prompt.txt"
    if data is not None:
        f.write_bytes(data)
    line = assert_error(*vidrt(capsys, *run_args(pkg, tmp_path / "a.mp4", "--prompt-file", str(f), prompt=None)),
                        2, needle)
    assert "UTF-8" in line or "does not exist" in line


def test_prompt_file_with_utf8_bom_is_read(capsys, pkg, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_bytes("\ufeffa cat walks".encode())
    code, err = vidrt(capsys, *run_args(pkg, tmp_path / "a.mp4", "--prompt-file", str(f), prompt=None))
    assert code == 0, err
    assert read_metadata(tmp_path / "a.mp4")["prompt"] == "a cat walks"


BAD_VALUES = [
    (["--size", "abc"], "WIDTHxHEIGHT"), (["--size", "32x"], "WIDTHxHEIGHT"),
    (["--size", "0x0"], "out of range"), (["--size", "0x32"], "out of range"),
    (["--size", "33x32"], "use 32 or 48"), (["--size", "32x8192"], "out of range"),
    (["--frames", "0"], "out of range"), (["--frames", "4"], "4k+1; use 1 or 5"),
    (["--frames", "100000"], "out of range"),
    (["--steps", "0"], "--steps 0"), (["--steps", "1001"], "1..1000"),
    (["--guidance", "-1"], "--guidance"), (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"),
    (["--shift", "0"], "--shift"), (["--shift", "-3"], "--shift"), (["--shift", "nan"], "--shift"),
    (["--shift", "1e9"], "--shift"),
    (["--seed", "-2"], "--seed"), (["--seed", str(2**63)], "--seed"),
    (["--fps", "0"], "--fps"), (["--fps", "241"], "--fps"), (["--crf", "-1"], "--crf"), (["--crf", "52"], "1..51"),
    (["--crf", "0"], "High 4:4:4 Predictive"),
    (["--threads", "0"], "--threads"), (["--threads", "100000"], "1..256"),
    (["--vae-memory", "0GB"], "--vae-memory 0GB must be more than 0 bytes"), (["--vae-memory", "lots"], "memory size"),
    (["--vae-memory", "2"], "--vae-memory 2 has no unit; write it like 2GB or 2GiB (2B if you mean bytes)"),
    (["--vae-memory", "1B"], "too small"), (["--vae-memory", "1KB"], "budget 1000 bytes is too small"),
    (["--scheduler", "ddim"], "unknown scheduler 'ddim'; use one of unipc, dpm++, euler"),
    (["--timesteps", "1000,x"], "--timesteps '1000,x' is not a comma-separated number list"),
    (["--recipe", "nope"], "unknown recipe 'nope'; use one of"),
    (["--backend", "cuda-magic"],
     "unknown backend 'cuda-magic'; use one of auto, onnxruntime, onnxruntime-cuda, tensorrt"),
    (["--steps", "many"], "--help"),  # click's own type check, still one line and exit 2
]


@pytest.mark.parametrize("extra, needle", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_out_of_range_values(capsys, pkg, tmp_path, extra, needle):
    out = tmp_path / "a.mp4"
    t0 = time.perf_counter()
    assert_error(*vidrt(capsys, *run_args(pkg, out, *extra)), 2, needle)
    assert time.perf_counter() - t0 < 5  # refused before any model work
    assert not out.exists() and temps(tmp_path) == []


# ---- the model package -------------------------------------------------------------------------


def test_missing_package_or_manifest(capsys, tmp_path):
    assert_error(*vidrt(capsys, *run_args(tmp_path / "nope", tmp_path / "a.mp4")), 3, "does not exist", "vidrt export")
    (tmp_path / "empty").mkdir()
    assert_error(*vidrt(capsys, *run_args(tmp_path / "empty", tmp_path / "a.mp4")), 3, "no manifest.json")


@pytest.mark.parametrize("name", ["vae_decode_step.onnx", "vae_decode_step.avx512f.onnx"])
def test_partial_package(capsys, pkg, tmp_path, name):
    p = copy_package(pkg, tmp_path / "p")
    (p / name).unlink()  # the default form, or the AVX-512 one (manifest cpu_artifacts): both are verified
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, f"{name} is missing", "re-export")
    assert not (tmp_path / "a.mp4").exists()


def test_a_newer_manifest_asks_for_a_newer_vidrt(capsys, pkg, tmp_path):
    """A field this vidrt does not know (a newer vidrt wrote the package) is refused as such, not as a broken
    package; a CPU form for a feature it does not know is verified but never opened: the run uses the
    default form."""
    p = copy_package(pkg, tmp_path / "p")
    raw = json.loads((p / MANIFEST_NAME).read_text())
    step = raw["components"]["vae_decode_step"]
    step["cpu_artifacts"]["sve2"] = step["cpu_artifacts"].pop("avx512f")
    (p / MANIFEST_NAME).write_text(json.dumps(raw))
    code, err = vidrt(capsys, *run_args(p, tmp_path / "a.mp4"))
    assert code == 0 and (tmp_path / "a.mp4").is_file(), err
    step["future_field"] = 1
    (p / MANIFEST_NAME).write_text(json.dumps(raw))
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "b.mp4")), 3, "future_field", "a newer vidrt wrote it",
                 "upgrade vidrt")


def test_tampered_artifact(capsys, pkg, tmp_path):
    p = copy_package(pkg, tmp_path / "p")
    data = bytearray((p / "dit.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    (p / "dit.onnx").write_bytes(bytes(data))
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "dit.onnx does not match its sha256")


def test_remembered_hashes_skip_unchanged_files_only(pkg, tmp_path, monkeypatch):
    """A second load does not re-read files that matched before (vidrt.package.verified); a same-size edit
    with its mtime put back is still hashed and refused (ctime moved); VIDRT_VERIFY=full hashes all."""
    from vidrt.errors import PackageError
    from vidrt.package import manifest as manifest_mod
    from vidrt.package import verified

    monkeypatch.setenv("VIDRT_CACHE_DIR", str(tmp_path / "cache"))
    p = copy_package(pkg, tmp_path / "p")
    hashed: list[str] = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda f, *a: hashed.append(f.name) or real(f, *a))
    every = {f for a in manifest_mod.all_artifacts(load_manifest(p, verify=False)) for f, _, _ in a.files()}

    load_manifest(p)  # files written just now are hashed but not remembered (same clock tick risk)
    load_manifest(p)
    assert sorted(hashed) == sorted([*every, *every])
    hashed.clear()
    monkeypatch.setattr(verified, "RACY_NS", 0)
    load_manifest(p)
    assert sorted(hashed) == sorted(every)
    hashed.clear()
    load_manifest(p)
    assert hashed == []  # nothing read again

    f = p / "dit.onnx"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(PackageError, match="dit.onnx does not match its sha256"):
        load_manifest(p)
    assert hashed == ["dit.onnx"]

    data[len(data) // 2] ^= 0xFF  # put the byte back
    f.write_bytes(bytes(data))
    hashed.clear()
    monkeypatch.setenv("VIDRT_VERIFY", "full")
    load_manifest(p)
    assert sorted(hashed) == sorted(every)


def test_truncated_onnx(capsys, pkg, tmp_path):
    p = copy_package(pkg, tmp_path / "p")
    f = p / "text_encoder.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "text_encoder.onnx has", "truncated")
    rehash(p, "text_encoder")  # a manifest that vouches for the truncated file: onnxruntime refuses it
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "cannot be loaded by onnxruntime")
    assert temps(tmp_path) == [] and not (tmp_path / "a.mp4").exists()


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_manifest_of_another_schema_version(capsys, pkg, tmp_path, version):
    p = copy_package(pkg, tmp_path / "p")
    raw = json.loads((p / MANIFEST_NAME).read_text())
    raw["schema_version"] = version
    (p / MANIFEST_NAME).write_text(json.dumps(raw))
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "schema version", "re-export")
    assert_error(*vidrt(capsys, "info", str(p)), 3, "schema version")


@pytest.mark.parametrize("damage", ["not json", "list", "no dit", "bad dtype", "nan std", "zero patch"])
def test_malformed_manifest(capsys, pkg, tmp_path, damage):
    p = copy_package(pkg, tmp_path / "p")
    raw = json.loads((p / MANIFEST_NAME).read_text())
    if damage == "no dit":
        del raw["components"]["dit"]
    elif damage == "bad dtype":
        raw["components"]["dit"]["contract"]["inputs"][0]["dtype"] = "complex-ish"
    elif damage == "nan std":
        raw["model"]["vae"]["latents_std"][0] = 1e308
    elif damage == "zero patch":
        raw["model"]["dit"]["patch_size"][1] = 0
    text = {"not json": "{ this is not json", "list": "[1, 2, 3]"}.get(damage, json.dumps(raw))
    (p / MANIFEST_NAME).write_text(text)
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "re-export")


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname", "sub/../../outside.onnx"])
def test_artifact_name_outside_the_package(capsys, pkg, tmp_path, name):
    p = copy_package(pkg, tmp_path / "p")
    shutil.copy(p / "dit.onnx", tmp_path / "outside.onnx")
    raw = json.loads((p / MANIFEST_NAME).read_text())
    raw["components"]["dit"]["artifact"]["file"] = name
    (p / MANIFEST_NAME).write_text(json.dumps(raw))
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "points outside the package folder")


def test_symlink_out_of_the_package(capsys, pkg, tmp_path):
    p = copy_package(pkg, tmp_path / "p")
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(p / "dit.onnx", outside)  # identical bytes: only the location is wrong
    (p / "dit.onnx").symlink_to(outside)
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "'dit.onnx' points outside the package")
    (p / "loop.onnx").symlink_to(p / "loop.onnx")  # a symlink loop as an artifact name
    raw = json.loads((p / MANIFEST_NAME).read_text())
    raw["components"]["dit"]["artifact"]["file"] = "loop.onnx"
    (p / MANIFEST_NAME).write_text(json.dumps(raw))
    assert_error(*vidrt(capsys, *run_args(p, tmp_path / "a.mp4")), 3, "loop.onnx")


def test_truncated_safetensors_checkpoint(capsys, tiny_t2v_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_t2v_checkpoint, ckpt, ignore=shutil.ignore_patterns("package"))
    f = next((ckpt / "transformer").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    out = tmp_path / "pkg"
    assert_error(*vidrt(capsys, "export", "--model", str(ckpt), "--variant", "wan2.1-t2v-1.3b", "--out", str(out)),
                 3, f.name, "truncated", "re-download")
    assert not (out / MANIFEST_NAME).exists()


class _Evil:
    """Unpickling this runs `touch MARKER`: what a malicious .pth does."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:  # any non-tensor object: needs pickle code to rebuild
    pass


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    from tiny import write_official_checkpoint

    root = tmp_path_factory.mktemp("official-t2v")
    write_official_checkpoint(root, "t2v")
    return root


@pytest.mark.parametrize("payload", ["os.system", "custom object", "legacy pickle"])
def test_pth_with_pickled_code_is_refused_not_run(capsys, official_checkpoint, tmp_path, payload):
    import pickle

    import torch

    ckpt = tmp_path / "ckpt"
    shutil.copytree(official_checkpoint, ckpt)
    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = str(marker)
    vae = ckpt / "Wan2.1_VAE.pth"
    if payload == "os.system":
        torch.save({"decoder.conv1.weight": torch.zeros(2), "x": evil}, vae)
    elif payload == "custom object":
        torch.save({"decoder.conv1.weight": torch.zeros(2), "x": _Custom()}, vae)
    else:  # not even a torch zip: a bare pickle stream
        vae.write_bytes(pickle.dumps(evil))
    out = tmp_path / "pkg"
    line = assert_error(*vidrt(capsys, "export", "--model", str(ckpt), "--variant", "wan2.1-t2v-1.3b",
                               "--out", str(out)), 3, "Wan2.1_VAE.pth", "refused", "nothing in it ran")
    assert "weights_only" not in line  # never advise loading it with code execution
    assert not marker.exists(), "the pickled os.system call ran"
    assert not (out / MANIFEST_NAME).exists()


# ---- output ------------------------------------------------------------------------------------


def test_existing_output_is_refused_unless_overwrite(capsys, pkg, tmp_path):
    out = tmp_path / "a.mp4"
    out.write_bytes(b"precious")
    assert_error(*vidrt(capsys, *run_args(pkg, out)), 5, "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    code, err = vidrt(capsys, *run_args(pkg, out, "--overwrite"))
    assert code == 0, err
    assert read_metadata(out)["prompt"] == "a cat walks on the beach" and temps(tmp_path) == []


def test_unwritable_output_folder(capsys, pkg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_error(*vidrt(capsys, *run_args(pkg, blocker / "a.mp4")), 5, "cannot create the output folder")
    assert_error(*vidrt(capsys, *run_args(pkg, tmp_path / "a.mp4", "--stats-json", str(blocker / "s.json"))),
                 5, "--stats-json")
    # read-only even for root: the system's reason, not "permission denied", and the fix
    with read_only_mount(tmp_path) as mnt:
        line = assert_error(*vidrt(capsys, *run_args(pkg, mnt / "a.mp4")), 5)
        assert line == f"error: cannot write in the output folder {mnt} (Read-only file system); give an " \
            "output path in a folder you can write to", line
        assert_error(*vidrt(capsys, *run_args(pkg, mnt / "sub" / "a.mp4")), 5,
                     f"cannot create the output folder {mnt / 'sub'} (Read-only file system); give an output path")


def test_export_out_on_a_read_only_mount_is_an_output_error(capsys, tiny_t2v_checkpoint, tmp_path):
    """vidrt export --out on a read-only mount (even for root): exit 5 with the system's reason and the fix,
    worded as vidrt batch / serve's --out check; a folder to create in it (mkdir) and the mount itself (the
    lock file); nothing is left in it."""
    with read_only_mount(tmp_path) as mnt:
        for out in (mnt / "pkg", mnt):
            line = assert_error(*vidrt(capsys, "export", "--model", str(tiny_t2v_checkpoint), "--variant",
                                       "wan2.1-t2v-1.3b", "--out", str(out)), 5)
            assert line == f"error: cannot write in --out {out} (Read-only file system); give a folder you can " \
                "write to", line
            assert os.listdir(mnt) == []


def test_stats_json_is_refused_before_any_work(capsys, pkg, tmp_path):
    """An existing --stats-json without --overwrite, the output's own path, a read-only folder: refused
    before the clip is made (no video appears), exit 5 / 2."""
    stats = tmp_path / "s.json"
    stats.write_text("precious")
    out = tmp_path / "a.mp4"
    assert_error(*vidrt(capsys, *run_args(pkg, out, "--stats-json", str(stats))), 5, "--stats-json", "exists",
                 "--overwrite")
    assert stats.read_text() == "precious" and not out.exists()
    assert_error(*vidrt(capsys, *run_args(pkg, out, "--stats-json", str(out))), 2, "--stats-json",
                 "output video")
    assert not out.exists()
    with read_only_mount(tmp_path) as mnt:
        assert_error(*vidrt(capsys, *run_args(pkg, out, "--stats-json", str(mnt / "s.json"))), 5,
                     "--stats-json", "Read-only")
        assert not out.exists()


@pytest.mark.parametrize("arg, needle", [("{f}:abc", "not a finite number"), ("{f}:nan", "not a finite number"),
                                         ("{f}:", "FILE[:STRENGTH]"), (":", "FILE[:STRENGTH]"),
                                         ("{d}", "is a folder")])
def test_bad_lora_argument(capsys, pkg, tmp_path, arg, needle):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    out = tmp_path / "a.mp4"
    assert_error(*vidrt(capsys, *run_args(pkg, out, "--lora", arg.format(f=lora, d=tmp_path))), 2, "--lora", needle)
    assert not out.exists()


def test_recipe_without_its_lora_is_refused(capsys, pkg, tmp_path):
    """lightx2v-4step has a LoRA slot the user fills (`LoRA yours` in `vidrt info`): without one the
    CLI refuses before any work (test_recipes: an explicit --sampler drops the recipe's timestep list)."""
    out = tmp_path / "a.mp4"
    assert_error(*vidrt(capsys, *run_args(pkg, out, "--recipe", "lightx2v-4step")), 2, "lightx2v-4step",
                 "--lora FILE")
    assert not out.exists()


@pytest.mark.parametrize("command", [["export", "--model", "ckpt"], ["cache", "split", "pkg"]])
def test_missing_torch_names_the_cpu_build_to_install(tmp_path, command):
    """vidrt export / cache split without torch: the fix installs the CPU build first, as the Makefile does
    (plain `pip install 'vidrt[export]'` resolves the multi-GB CUDA build) (tester report s7 item 7)."""
    code = ("import sys; sys.modules['torch'] = None  # import torch fails, find_spec('torch') is None\n"
            f"from vidrt.cli import main; main({command!r})")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    line = assert_error(res.returncode, res.stderr, 2, "the export extras (torch is missing)")
    import re

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    pin = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M)[1]  # the torch the Makefile installs
    assert line.endswith(f"install the CPU build of torch first, then the extras: pip install {pin} --index-url "
                         "https://download.pytorch.org/whl/cpu && pip install 'vidrt[export]'"), line


@pytest.mark.parametrize("budget, needle", [("24", "--gpu-memory 24 has no unit; write it like 24GB or 24GiB"),
                                            ("0GB", "--gpu-memory 0GB must be more than 0 bytes"),
                                            ("8GB,0", "--gpu-memory 0 has no unit"),
                                            ("lots", "--gpu-memory 'lots' is not a memory size")])
def test_plan_gpu_memory_needs_a_unit_and_a_positive_size(capsys, budget, needle):
    """`vidrt plan --gpu-memory 24` is refused (exit 2), not planned for a 24-byte card (exit 4) (tester
    report s7 item 9); `vidrt build --gpu-memory` / `--vae-memory` read sizes the same way."""
    assert_error(*vidrt(capsys, "plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--gpu-memory", budget), 2, needle)


def test_a_batch_line_for_another_model_names_the_fix(capsys, tmp_path):
    """A `vidrt batch` line naming another model: refused before Ray starts, saying what to do (leave
    "model" out, or run that line in its own batch with --model) (tester report s7 item 11)."""
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"prompt": "a red circle", "model": "wan2.1-t2v-1.3b"}\n', encoding="utf-8")
    line = assert_error(*vidrt(capsys, "batch", lines, "--out", tmp_path / "out"), 2,
                        "is not this batch's model", "one batch runs one model")
    assert line.endswith('leave "model" out of the line to use this one, or run the line in a batch of its own '
                         'with --model wan2.1-t2v-1.3b'), line


def test_plan_names_the_stages_over_the_budget_and_their_fix(capsys):
    """1.3B 832x480x81 on 4GB: the 13.84 GiB the error quotes is umT5's stage, which no --size fixes: the
    error names the stages over and --text-encoder cpu; with umT5 on the CPU only the DiT's stage is over
    and the fix is the clip's size (tester report s7, `vidrt plan` note)."""
    plan = ["plan", "wan2.1-t2v-1.3b", "--size", "832x480", "--frames", "81", "--gpu-memory", "4GB"]
    line = assert_error(*vidrt(capsys, *plan), 4, "(over: text ", ", denoise ")
    assert line.endswith("; run the text encoder on the CPU (--text-encoder cpu), lower --size or --frames, or plan "
                         "a larger card (--gpu-memory)"), line
    line = assert_error(*vidrt(capsys, *plan, "--text-encoder", "cpu"), 4, "(over: denoise ")
    assert "text " not in line and line.endswith("; lower --size or --frames, or plan a larger card (--gpu-memory)")


def test_unsupported_output_suffix_is_a_usage_error(capsys, pkg, tmp_path):
    assert_error(*vidrt(capsys, *run_args(pkg, tmp_path / "x.avi")), 2, ".avi", ".mp4", ".webm")


@pytest.mark.parametrize("output", ["a.mp4", "a.webm", "frames/"])
def test_full_disk(capsys, pkg, tmp_path, output):
    """A real full disk: a 64 KiB tmpfs filled to the last byte (needs root; no monkeypatching)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 1024)
            except OSError:
                pass
        line = assert_error(*vidrt(capsys, *run_args(pkg, mnt / output, "--frames", "9")), 5)
        assert "No space left on device" in line
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]  # no output, no temporaries
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _signal_mid_run(pkg: Path, tmp_path: Path, sig: signal.Signals) -> tuple[int, str, float]:
    """Start a real run over an existing output (--overwrite), signal it once denoising is under way."""
    out = tmp_path / "a.mp4"
    out.write_bytes(b"the old clip")
    args = [VIDRT, *run_args(pkg, out, "--overwrite")]
    # Long enough to be mid-run for sure on a fast idle machine too (1000 steps over 576 tokens: several
    # seconds; 200 steps at 32x32 once finished before the signal came).
    for flag, value in (("--steps", "1000"), ("--size", "128x128"), ("--frames", "33")):
        args[args.index(flag) + 1] = value
    args.remove("-q")
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = ""
    while "denoise:" not in seen:  # the progress bar: the temp file is open, steps are running
        ch = proc.stderr.read(1)
        assert ch, f"vidrt ended early: {seen}"
        seen += ch
    time.sleep(0.3)
    proc.send_signal(sig)
    t0 = time.perf_counter()
    rest = proc.stderr.read()
    proc.wait(timeout=10)
    return proc.returncode, seen + rest, time.perf_counter() - t0


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_run(pkg, tmp_path, sig, code, word):
    rc, err, seconds = _signal_mid_run(pkg, tmp_path, sig)
    assert rc == code, err  # not 0: the signal stopped the run instead of waiting for its 1000 steps
    # Promptly: the current DiT call ends, then cleanup; ~0.1 s idle. The bound is loose because CI machines
    # are shared (a step can take 0.5 s at load 15); a run that ignored the signal would take minutes.
    assert seconds < 10.0
    assert err.rstrip().splitlines()[-1].endswith(word) and "Traceback" not in err
    assert (tmp_path / "a.mp4").read_bytes() == b"the old clip"  # never damaged
    assert temps(tmp_path) == []


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_a_c_extension_import(capsys, monkeypatch, sig, code, word):
    """A Ctrl-C that lands while a C extension initialises surfaces as `ImportError: initialization
    failed` (seen in CI, killing `vidrt run` at start-up): still the user's signal, not an internal error."""
    import click
    from vidrt.cli import app as cli_module

    @click.command("fake-import")
    def fake_import() -> None:
        try:
            os.kill(os.getpid(), sig)  # the handler main() installed raises here
            time.sleep(5)
        except BaseException as exc:  # what a failing PyInit_* does with the pending exception
            raise ImportError("initialization failed") from exc

    monkeypatch.setitem(cli_module.cli.commands, "fake-import", fake_import)
    rc, err = vidrt(capsys, "fake-import")
    assert (rc, err.strip()) == (code, word)
    rc, err = vidrt(capsys, "info", "/nonexistent/package")  # the record does not outlive that run
    assert rc == 3 and err.startswith("error: ")


# ---- numerics ----------------------------------------------------------------------------------


def _nan_package(src: Path, dest: Path, component: str, precision: str | None = None) -> Path:
    """A copy of the package whose `component` graph has NaN weights (and a manifest that vouches for it)."""
    import onnx
    from onnx import numpy_helper

    p = copy_package(src, dest)
    model = onnx.load(str(p / f"{component}.onnx"))
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim >= 2 and "weight" in init.name:
            init.CopyFrom(numpy_helper.from_array(np.full_like(a, np.nan), init.name))
    onnx.save(model, str(p / f"{component}.onnx"))
    rehash(p, component)
    if precision is not None:
        raw = json.loads((p / MANIFEST_NAME).read_text())
        raw["components"][component]["precision"] = precision
        (p / MANIFEST_NAME).write_text(json.dumps(raw))
    return p


@pytest.mark.parametrize("component, precision, needles", [
    ("text_encoder", None, ["the text encoder produced NaN/Inf", "re-export"]),
    ("text_encoder", "fp16", ["the text encoder produced NaN/Inf (fp16)", "umT5 overflows", "fp32"]),
    ("dit", None, ["the denoiser (dit, step 1/1) produced NaN/Inf"]),
    ("dit", "fp16", ["denoiser (dit, step 1/1)", "fp16", "bf16 or fp32"]),
    ("vae_decode_first", None, ["the VAE decoder produced NaN/Inf"]),
])
def test_nan_in_a_stage(capsys, pkg, tmp_path, component, precision, needles):
    p = _nan_package(pkg, tmp_path / "p", component, precision)
    out = tmp_path / "a.mp4"
    assert_error(*vidrt(capsys, *run_args(p, out)), 4, *needles)
    assert not out.exists() and temps(tmp_path) == []


# ---- concurrency -------------------------------------------------------------------------------


def test_concurrent_exports_are_serialised_by_the_lock(tiny_t2v_checkpoint, pkg, tmp_path):
    from tiny import TINY_VARIANT
    from vidrt.export.package import LOCK_FILE, export_package

    p = copy_package(pkg, tmp_path / "p")  # same inputs: the second export reuses every stage
    before = (p / MANIFEST_NAME).stat().st_mtime_ns
    with open(p / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another export" holds the folder
        worker = threading.Thread(target=export_package, args=(tiny_t2v_checkpoint, p),
                                  kwargs={"variant": TINY_VARIANT["t2v"], "progress": False})
        worker.start()
        worker.join(timeout=3)
        assert worker.is_alive(), "the export did not wait for the lock"
        assert (p / MANIFEST_NAME).stat().st_mtime_ns == before
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=120)
    assert not worker.is_alive()
    load_manifest(p, verify=True)  # finished after the first, intact


def test_killed_export_leaves_nothing_trusted(capsys, tiny_t2v_checkpoint, pkg, tmp_path):
    """SIGKILL a re-export (new VAE weights) while it writes: the next `vidrt run` either refuses the
    package with one line (exit 3) or runs on files that all still match their sha256."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_t2v_checkpoint, ckpt, ignore=shutil.ignore_patterns("package"))
    p = copy_package(pkg, tmp_path / "p")
    vae = next((ckpt / "vae").glob("*.safetensors"))
    os.utime(vae, ns=(time.time_ns(), time.time_ns()))  # changed inputs: the VAE stage must run again
    code = ("from vidrt.export.package import export_package; import sys; "
            "export_package(sys.argv[1], sys.argv[2], variant='wan2.1-t2v-1.3b', progress=False)")
    start = time.time_ns()
    proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(p)], stderr=subprocess.DEVNULL)

    def writing() -> bool:  # the VAE stage has begun: a temp folder or a rewritten file in the package
        return any(x.name.startswith(".vae") or x.stat().st_mtime_ns > start for x in p.iterdir()
                   if x.name != LOCK_FILE)

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not writing():
        time.sleep(0.02)
    time.sleep(np.random.default_rng().uniform(0, 1.0))
    proc.kill()
    proc.wait()
    code_, err = vidrt(capsys, *run_args(p, tmp_path / "a.mp4"))
    if code_ == 0:  # killed before anything was replaced, or after the new manifest: every file verifies
        load_manifest(p, verify=True)
    else:
        assert_error(code_, err, 3, "re-export")


# ---- no traceback unless --debug ---------------------------------------------------------------


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, err = vidrt(capsys, "--debug", *run_args(tmp_path / "nope", tmp_path / "a.mp4"))
    assert code == 3 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


# ---- onnxruntime failing in the middle of a run (docs/errors.md row 35) --------------------------


@pytest.mark.parametrize("kind, code, needles", [
    ("RuntimeException", 4, ["dit failed in onnxruntime", "Failed to allocate memory", "--size"]),
    ("InvalidArgument", 3, ["dit does not accept the inputs its manifest describes", "re-export"]),
])
def test_onnxruntime_fails_mid_run(capsys, monkeypatch, pkg, tmp_path, kind, code, needles):
    """The second DiT call fails inside onnxruntime (its own exception types): one line naming the
    component, exit 4 (3 when the graph rejects what the manifest describes), the existing output kept."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    messages = {"RuntimeException": "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                                    "while running MatMul node. Failed to allocate memory for requested buffer",
                "InvalidArgument": "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input"}
    real, dit_calls = ort.InferenceSession.run, []

    def run(self, output_names, feeds, *args, **kwargs):
        if "hidden_states" in feeds:
            dit_calls.append(1)
            if len(dit_calls) == 2:
                raise getattr(state, kind)(messages[kind])
        return real(self, output_names, feeds, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    out = tmp_path / "a.mp4"
    out.write_bytes(b"an earlier clip")
    line = assert_error(*vidrt(capsys, *run_args(pkg, out, "--steps", "2", "--overwrite")), code, *needles)
    assert len(dit_calls) == 2 and "Traceback" not in line
    assert out.read_bytes() == b"an earlier clip" and temps(tmp_path) == []

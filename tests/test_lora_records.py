"""Every LoRA a clip was made with is in its records (issue 12 user report): Result.settings, --stats-json
and the file's metadata list the pipeline's (`--lora`, Pipeline.load(loras=)), the recipe's and the
request's, with strength and expert; baked LoRAs are recorded in the package and never merged twice."""

from __future__ import annotations

import json
import re
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


def test_a_baked_lora_is_recorded_and_never_merged_again(bundled, tmp_path, capsys):
    """A package with the recipe's LoRA baked in (what `vidrt export --lora` writes: bake_loras +
    baked_records) says so in `vidrt info`; `--recipe fast` on it does not add the LoRA a second time
    (one-line note) and makes the bundled model's `--recipe fast` clip exactly."""
    import shutil
    from dataclasses import replace

    from vidrt import Pipeline, Request
    from vidrt.cli import main
    from vidrt.export.package_extras import bake_loras, baked_records
    from vidrt.package.manifest import load_manifest, write_manifest
    from vidrt.package.recipes import LoraRef

    package, manifest = bundled
    baked = tmp_path / "baked"
    shutil.copytree(package, baked)
    fast = LoraRef(str(baked / "fast_lora.safetensors"), 1.0)
    changed = bake_loras(baked, manifest.components, "dit", [fast])
    write_manifest(baked, replace(manifest, components={**manifest.components, **changed},
                                  baked_loras=baked_records([fast], manifest.model.experts)))
    assert load_manifest(baked).baked_loras[0].file == "fast_lora.safetensors"
    main(["info", str(baked)])
    shown = capsys.readouterr().out
    assert "baked LoRA   fast_lora.safetensors x1, sha256 " in shown, shown

    request = Request(prompt="a red circle moving left", width=32, height=32, num_frames=1, seed=3, recipe="fast")
    notes: list[str] = []
    twice = Pipeline.load(baked, warn=notes.append).run(request)
    assert len(notes) == 1 and "already baked into this package" in notes[0], notes
    # recorded as baked (the file's name, its baked strength), merged nothing
    assert twice.settings.loras == (LoraRef("fast_lora.safetensors", 1.0, baked=True),), twice.settings.loras
    assert twice.stats.lora_merge_bytes == 0
    once = Pipeline.load(package, warn=lambda _: None).run(request)
    assert np.array_equal(twice.frames, once.frames)


def test_the_same_lora_file_given_twice_is_merged_once_or_refused(bundled, tmp_path, capsys):
    """`--recipe fast --lora .../fast_lora.safetensors:0.5`: merged once at the user's strength, one line
    says so (the records list it once); the same file twice by the user is refused, naming both."""
    import shutil

    from vidrt import Pipeline
    from vidrt.errors import UsageError

    package, manifest = bundled
    copy = shutil.copy(package / "fast_lora.safetensors", tmp_path / "mine.safetensors")  # same bytes, other name
    stats = tmp_path / "s.json"
    code, err = vidrt(capsys, "run", "-p", "a red circle moving left", "--seed", "3", "--recipe", "fast",
                      "--lora", f"{copy}:0.5", "--stats-json", stats, "-o", tmp_path / "c.mp4",
                      "--size", "32x32", "--frames", "1")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(notes) == 1 and "is the recipe's own LoRA fast_lora.safetensors; merged once, at strength 0.5" \
        in notes[0], err
    recorded = json.loads(stats.read_text())["settings"]["loras"]
    assert [(r["path"], r["strength"]) for r in recorded] == [(str(copy), 0.5)]

    style = small_lora(tmp_path / "style.safetensors", manifest.model.dit.dim)
    with pytest.raises(UsageError, match=r"is the same file as .*style.safetensors.*give it once"):
        Pipeline.load(package, loras=[(str(style), 0.5), (str(shutil.copy(style, tmp_path / "b.safetensors")), 1)])


def test_messages_name_the_fix_in_the_callers_own_words(bundled, tmp_path, capsys):
    """A per-expert LoRA on a one-denoiser model names the form that gives it for every expert (`--lora
    FILE`, `loras=[...]`, a job's loras item without `dit_high=`); the Python API's warning for a recipe
    without its LoRA names no `vidrt run` flag (tester report s7 item 11)."""
    from vidrt import Pipeline, Request
    from vidrt.errors import UsageError, spelled_as
    from vidrt.package.recipes import LoraRef
    from vidrt.service.api import API_FIELDS
    from vidrt.service.jobs import JOB_FIELDS

    package, manifest = bundled
    style = small_lora(tmp_path / "style.safetensors", manifest.model.dit.dim)
    code, err = vidrt(capsys, "run", "-p", "a red circle", "--lora-high-noise", style, "-o", tmp_path / "a.png", *TINY)
    assert code == 2 and err.strip().endswith(f"is for expert dit_high, this model has dit; a LoRA on a one-denoiser "
                                              f"model is for every expert: give it as --lora {style}"), err
    with pytest.raises(UsageError, match=re.escape(f"give it as loras=[({str(style)!r}, 1.0)]")):
        Pipeline.load(package, loras=[LoraRef(str(style), 1.0, "dit_high")])
    for spelling in (JOB_FIELDS, API_FIELDS):
        with spelled_as(spelling), pytest.raises(UsageError, match='name it in loras without "dit_high="$'):
            Pipeline.load(package, loras=[LoraRef(str(style), 1.0, "dit_high", label="loras dit_high=style")])

    notes: list[str] = []
    Pipeline.load(package, warn=notes.append).run(Request(prompt="a red circle", width=32, height=32, num_frames=1,
                                                          recipe="lightx2v-4step"))
    assert len(notes) == 1 and "pass loras=[('FILE', 1.0)]" in notes[0] and "--" not in notes[0], notes


def test_a_lora_that_blows_up_the_dit_is_named(bundled, tmp_path, capsys, monkeypatch):
    """lora_up x 1e30 (the user's huge.safetensors): refused at the merge in one line naming the file and
    its strength (exit 2, no clip), not a NaN blamed on --guidance/--shift after step 1; and when NaN/Inf
    does come out of a DiT with LoRAs merged, the message names them as the likely cause."""
    from vidrt import Pipeline, Request
    from vidrt.errors import DeviceError
    from vidrt.lora import merge

    package, manifest = bundled
    from safetensors.numpy import load_file

    huge = tmp_path / "huge.safetensors"
    save_file({k: v * np.float32(1e30) if "lora_up" in k else v
               for k, v in load_file(str(package / "fast_lora.safetensors")).items()}, str(huge))
    out = tmp_path / "c.mp4"
    code, err = vidrt(capsys, "run", "-p", "a red circle moving left", "--recipe", "fast", "--lora", f"{huge}:1",
                      "-o", out, *TINY)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"--lora {huge} (strength 1) would make the DiT weight blocks.0.attn2.to_k.weight change by up" \
        in lines[0] and "lower the strength, or use another file" in lines[0], err
    assert not out.exists()

    monkeypatch.setattr(merge, "MAX_DELTA_RATIO", float("inf"))  # past the merge's guard: the DiT's NaN
    pipe = Pipeline.load(package, loras=[(str(huge), 2.0)], warn=lambda _: None)
    with pytest.raises(DeviceError) as caught:
        pipe.run(Request(prompt="a red circle moving left", width=32, height=32, num_frames=1, recipe="fast"))
    text = str(caught.value)
    assert "the denoiser (dit, step 1/4) produced NaN/Inf" in text and "--guidance" not in text, text
    assert f"LoRA {huge} (strength 2), LoRA fast_lora.safetensors (strength 1); lower the strength" in text, text


def test_export_refuses_a_mismatched_lora_before_any_stage(tiny_t2v_checkpoint, tmp_path, capsys, monkeypatch):
    """`vidrt export --lora` checks keys and shapes against the checkpoint's DiT (safetensors headers) before
    exporting anything: another size, another architecture, a per-expert LoRA on a one-denoiser model, one
    file given twice (tester report s7 item 5)."""
    import shutil

    import vidrt.export.package as export_package_module
    from tiny import TINY_VARIANT

    def too_late(*_a, **_k):
        raise AssertionError("an export stage ran before the LoRA was checked")

    monkeypatch.setattr(export_package_module, "export_text_encoder", too_late)
    monkeypatch.setattr(export_package_module, "export_dit", too_late)
    wide, sd15 = tmp_path / "wide.safetensors", tmp_path / "sd15.safetensors"
    small_lora(wide, 1536)  # a 1.3B-wide LoRA on the 64-wide tiny model
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, 4), np.float32)},
              str(sd15))
    out = tmp_path / "pkg"
    for flag, lora, needle in (("--lora", wide, "does not fit this model: blocks.0.attn1.to_q.weight needs [64, 64]"),
                               ("--lora", sd15, "is not a LoRA for this Wan DiT"),
                               ("--lora-high-noise", wide, "is for expert dit_high, this model has dit")):
        code, err = vidrt(capsys, "export", "--model", tiny_t2v_checkpoint, "--variant", TINY_VARIANT["t2v"],
                          "--out", out, flag, lora)
        assert code == 2 and needle in err and f"{flag} {lora}" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # one file (by sha256) given twice, under another name and strength: refused in `vidrt run`'s words
    fits = small_lora(tmp_path / "fits.safetensors", 64)
    again = Path(shutil.copy(fits, tmp_path / "again.safetensors"))
    code, err = vidrt(capsys, "export", "--model", tiny_t2v_checkpoint, "--variant", TINY_VARIANT["t2v"],
                      "--out", out, "--lora", fits, "--lora", f"{again}:0.5")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--lora {again} is the same file as --lora {fits}; a LoRA given twice would be merged twice: give it " \
           "once, with the strength you want" in err, err
    assert not out.exists()


def test_cli_messages_say_what_is_wrong(bundled, tmp_path, capsys):
    """An empty LoRA file, a LoRA with no tensors, 1001 --timesteps without --steps, an output on a file
    system that takes no files: one line each, naming the real problem (and the fix)."""
    from cli_helpers import assert_error

    empty, no_tensors = tmp_path / "empty.safetensors", tmp_path / "none.safetensors"
    empty.write_bytes(b"")
    save_file({}, str(no_tensors))
    run = ["run", "-p", "a red circle moving left", "-o", tmp_path / "c.mp4", *TINY]
    assert_error(*vidrt(capsys, *run, "--lora", empty), 2, f"--lora {empty} is empty (0 bytes", "re-download it")
    assert_error(*vidrt(capsys, *run, "--lora", no_tensors), 2, f"--lora {no_tensors} holds no tensors")
    many = ",".join(str(1000 - i * 0.5) for i in range(1001))
    assert_error(*vidrt(capsys, *run, "--sampler", "euler", "--timesteps", many), 2,
                 "--timesteps has 1001 values; give 1..")
    if Path("/proc").is_dir():  # procfs: the folder exists and looks writable, but takes no new files
        assert_error(*vidrt(capsys, "run", "-p", "a red circle moving left", "-o", "/proc/o.mp4", *TINY), 5,
                     "cannot write /proc/o.mp4", "write it to a folder of a normal, writable file system")


@pytest.mark.parametrize("header", ['"abc"', "1", "null", '{"__metadata__": [1, 2]}',
                                    '{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}',
                                    '{"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 4]}}',
                                    '{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
                                    '{"a": {"dtype": "F32", "shape": [100000000000], "data_offsets": [0, 4]}}'])
def test_a_malformed_safetensors_header_is_one_line_naming_the_file(tmp_path, header):
    """A header that is JSON but not the format (not an object, __metadata__ not an object, a dimension that
    is no non-negative integer or does not fit its bytes) is a UsageError naming the file, from the full
    read and from the header-only check a server makes before it queues a job."""
    import struct

    from vidrt.errors import UsageError
    from vidrt.lora.merge import read_lora, read_lora_header

    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    for read in (read_lora, read_lora_header):
        with pytest.raises(UsageError, match=r"^--lora odd\.safetensors is not a safetensors LoRA file \(.+"):
            read(path, "--lora odd.safetensors")


def test_a_lora_rewritten_under_the_same_name_is_read_again(bundled, tmp_path):
    """A long-lived Pipeline (a server worker) given a LoRA file that was replaced under the same name
    (re-trained, a --lora-dir file swapped) merges its new contents, as a fresh Pipeline does, and keeps
    one version of each file, not every version it ever read."""
    import os

    from vidrt import Pipeline, Request

    package, manifest = bundled
    path = small_lora(tmp_path / "style.safetensors", manifest.model.dit.dim, 0.0)
    request = Request(prompt="a red circle", width=32, height=32, num_frames=1, steps=1, seed=1,
                      loras=((str(path), 1.0),))
    pipe = Pipeline.load(package, threads=1, warn=lambda _: None)
    before = pipe.run(request).frames
    for n, value in enumerate((0.05, 0.1), 1):
        small_lora(path, manifest.model.dit.dim, value)  # same name, same size, other contents
        st = path.stat()  # the file clock ticks coarsely (~ms): a later write has a later mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + n * 10**7))
        after = pipe.run(request).frames
    fresh = Pipeline.load(package, threads=1, warn=lambda _: None).run(request).frames
    assert not np.array_equal(before, fresh)  # the two versions make different clips
    np.testing.assert_array_equal(after, fresh)
    assert len(pipe._merger._files) == 1 and not pipe._parked  # the old versions and their sessions dropped


def test_the_recipes_lora_given_at_strength_zero_turns_it_off(bundled, tmp_path):
    """`recipe: fast` with the recipe's own file at strength 0 in the request: merged once, at the user's
    strength (0: not at all), whichever order the two come in; the records list the 0-strength file alone
    (so they reproduce the clip), not the recipe's at 1 as well."""
    import shutil

    from vidrt import Pipeline, Request

    package, _ = bundled
    mine = tmp_path / "mine.safetensors"
    shutil.copy(package / "fast_lora.safetensors", mine)
    notes: list[str] = []
    kw = dict(prompt="a red circle", width=32, height=32, num_frames=1, seed=2, recipe="fast")
    request_last = Pipeline.load(package, threads=1, warn=notes.append).run(Request(**kw, loras=((str(mine), 0.0),)))
    load_first = Pipeline.load(package, threads=1, loras=[(str(mine), 0.0)], warn=notes.append).run(Request(**kw))
    with_lora = Pipeline.load(package, threads=1, warn=notes.append).run(Request(**kw))
    for result in (request_last, load_first):
        assert [(Path(r.path).name, r.strength) for r in result.settings.loras] == [("mine.safetensors", 0.0)]
    np.testing.assert_array_equal(request_last.frames, load_first.frames)
    assert not np.array_equal(request_last.frames, with_lora.frames)  # the LoRA at 1 does change the clip
    assert any("not merged (strength 0 replaces the recipe's 1)" in n for n in notes), notes


def test_a_baked_distillation_lora_fills_its_recipes_slot(baked_package, tmp_path, capsys):
    """A package with the distillation LoRA baked in (`vidrt export --lora distill.safetensors`): `vidrt run
    --recipe lightx2v-4step` runs without --lora (the weights are in the package), and with the same file
    given again says it is baked, not that no LoRA was given; the Python API does not warn either."""
    from vidrt import Pipeline, Request

    baked, distill = baked_package
    run = ["run", "-m", baked, "-p", "a red circle", "--seed", "1", "--recipe", "lightx2v-4step", *TINY]
    code, err = vidrt(capsys, *run, "-o", tmp_path / "a.png")
    assert code == 0 and "none was given" not in err, err
    code, err = vidrt(capsys, *run, "--lora", distill, "-o", tmp_path / "b.png")
    assert code == 0 and "already baked into this package" in err and "none was given" not in err, err
    notes: list[str] = []
    Pipeline.load(baked, threads=1, warn=notes.append).run(
        Request(prompt="a red circle", width=32, height=32, num_frames=1, seed=1, recipe="lightx2v-4step"))
    assert not notes, notes


def test_a_baked_lora_is_in_every_record_of_the_clip(baked_package, tmp_path, capsys):
    """`-m baked --lora distill.safetensors:0` runs with the baked LoRA at strength 1 (tester report s7 item
    6): --stats-json settings.loras and the file's metadata say so, marked baked, first; the user's own
    LoRAs follow; Result.settings lists the same."""
    from vidrt import Pipeline, Request
    from vidrt.package.manifest import load_manifest
    from vidrt.video import read_metadata

    baked, distill = baked_package
    style = small_lora(tmp_path / "style.safetensors", load_manifest(baked, verify=False).model.dit.dim, value=0.02)
    out, stats = tmp_path / "c.png", tmp_path / "s.json"
    code, err = vidrt(capsys, "run", "-m", baked, "-p", "a red circle", "--seed", "1", "--steps", "1",
                      "--lora", f"{distill}:0", "--lora", f"{style}:0.5", "--stats-json", stats, "-o", out, *TINY)
    assert code == 0 and "already baked into this package" in err, err
    recorded = [(Path(r["path"]).name, r["strength"], r["baked"])
                for r in json.loads(stats.read_text())["settings"]["loras"]]
    assert recorded == [("distill.safetensors", 1.0, True), ("style.safetensors", 0.5, False)], recorded
    assert read_metadata(out)["loras"] == ["distill.safetensors:1 baked", "style.safetensors:0.5"]
    result = Pipeline.load(baked, threads=1, warn=lambda _: None).run(
        Request(prompt="a red circle", width=32, height=32, num_frames=1, seed=1, steps=1))
    assert [(r.path, r.strength, r.baked) for r in result.settings.loras] == [("distill.safetensors", 1.0, True)]

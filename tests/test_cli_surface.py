"""The CLI a newcomer meets: bare `vidrt`, options that messages name, the ONNX Runtime CUDA provider,
`--model` pointing at a file, and warnings/metadata that describe the prompt the model receives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
from cli_helpers import SMALL, assert_error, vidrt
from vidrt.video import read_metadata

ROOT = Path(__file__).resolve().parent.parent
# Other programs' command lines quoted in vidrt's messages: their flags are theirs, not vidrt's.
FOREIGN = re.compile(r"`?(ray start|pip install|python -m [\w.]+|nvidia-smi|trtexec)[^`;)]*`?")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _cli_flags() -> set[str]:
    """Every option (and its --no-/secondary form) of every `vidrt` command, subgroups included."""
    from vidrt.cli.app import cli

    flags: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            flags.update(o for o in [*p.opts, *p.secondary_opts] if o.startswith("--"))
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                walk(sub)

    walk(cli)
    flags.add("--help")
    return flags


def _message_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String pieces (f-string parts too) of raised errors, warnings, echoed lines and option help."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        roots: list[ast.AST] = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("warn", "echo", "secho", "print", "BackendStatus", "ApiError"):
                roots.extend(node.args)
            roots.extend(k.value for k in node.keywords if k.arg in ("help", "reason", "hint", "message"))
        elif isinstance(node, ast.Return) and node.value is not None:
            roots.append(node.value)  # message builders (`return f"... --flag"`)
        for root in roots:
            for sub in ast.walk(root):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append((sub.lineno, sub.value))
    return out


def test_every_flag_a_message_names_exists():
    """Each `--flag` in a message of the runtime (vidrt) or the exporter is an option of some `vidrt`
    command. Reads the current code and the current click tree, so new flags and messages are covered."""
    known = _cli_flags()
    wrong: list[str] = []
    checked = 0
    for folder in ("runtime", "export"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "argparse" in path.read_text(encoding="utf-8"):
                continue  # a script with its own command line (train_tiny, contact_sheet): its own flags
            for line, text in _message_strings(ast.parse(path.read_text(encoding="utf-8"))):
                for flag in FLAG.findall(FOREIGN.sub("", text)):
                    checked += 1
                    if flag not in known:
                        wrong.append(f"{path.relative_to(ROOT)}:{line}: {flag}")
    assert checked > 50  # the scan finds the messages
    assert not wrong, "messages name options that do not exist:\n" + "\n".join(wrong)


def test_bare_vidrt_prints_the_normal_help():
    """Not the help squashed into one `error:` line: the same text as `vidrt --help`, exit 0."""
    import subprocess

    from cli_helpers import VIDRT

    bare = subprocess.run([VIDRT], capture_output=True, text=True, timeout=60)
    helped = subprocess.run([VIDRT, "--help"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and not bare.stderr, bare.stderr
    assert bare.stdout == helped.stdout and "Commands:" in bare.stdout


# ---- ONNX Runtime's CUDA provider ----------------------------------------------------------------


def test_onnxruntime_cuda_is_a_backend_and_says_why_not_here(capsys, run_package, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime's CUDA provider")
    out = tmp_path / "a.mp4"
    line = assert_error(*vidrt(capsys, "run", "-m", run_package, "-p", "a red circle", "-o", out,
                               "--backend", "onnxruntime-cuda", *SMALL), 4, "CUDA provider", "onnxruntime-gpu")
    assert "--backend onnxruntime" in line and not out.exists()


def test_onnxruntime_cuda_asks_onnxruntime_for_the_cuda_provider(monkeypatch, run_package):
    """With a CUDA provider present, the sessions are created with CUDA first, CPU as fallback."""
    import onnxruntime as ort
    import vidrt

    seen: list[list[str]] = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        seen.append(list(providers))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    pipe = vidrt.Pipeline.load(run_package, backend="onnxruntime-cuda")
    result = pipe("a red circle", size="32x32", num_frames=1, steps=1, seed=1)
    assert result.stats.backend == "onnxruntime-cuda"
    assert seen and all(p == ["CUDAExecutionProvider", "CPUExecutionProvider"] for p in seen)


# ---- --model pointing at a file ------------------------------------------------------------------


def test_model_that_is_a_file_is_named_a_file(capsys, run_package, tmp_path):
    manifest = Path(run_package) / "manifest.json"
    onnx = next(Path(run_package).glob("*.onnx"))
    line = assert_error(*vidrt(capsys, "run", "-m", manifest, "-p", "a cat", "-o", tmp_path / "a.mp4", *SMALL), 3,
                        "is a file, not a model package folder")
    assert str(Path(run_package)) in line  # the folder to pass instead
    assert_error(*vidrt(capsys, "info", onnx), 3, "is a file")
    assert_error(*vidrt(capsys, "export", "--model", manifest, "--out", tmp_path / "pkg"), 3,
                 "is a file, not a checkpoint folder")
    assert not (tmp_path / "pkg").exists()


# ---- warnings and metadata describe the prompt the model receives ---------------------------------


def test_warnings_and_metadata_describe_the_cleaned_prompt(capsys, run_package, tmp_path):
    out = tmp_path / "a.mp4"
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a red circle &amp; moving   left\n", encoding="utf-8")
    code, err = vidrt(capsys, "run", "-m", run_package, "--prompt-file", prompt_file, "-o", out, *SMALL)
    assert code == 0, err
    assert "amp" not in err, err  # `&amp;` reaches the model as `&`: no warning about a word "amp"
    meta = read_metadata(out)
    assert meta["prompt"] == "a red circle & moving left"  # no trailing newline, no entity, one space
    import av

    with av.open(str(out)) as c:
        assert c.metadata["title"] == "a red circle & moving left"


def test_an_empty_prompt_after_cleaning_is_refused(capsys, run_package, tmp_path):
    out = tmp_path / "a.mp4"
    assert_error(*vidrt(capsys, "run", "-m", run_package, "-p", "&nbsp;", "-o", out, *SMALL), 2, "prompt is empty")


def test_long_negative_prompt_warning_says_which_prompt(capsys, run_package, tmp_path):
    out = tmp_path / "a.mp4"
    code, err = vidrt(capsys, "run", "-m", run_package, "-p", "a red circle", "--negative-prompt",
                      " ".join(["blurry"] * 600), "-o", out, *SMALL)
    assert code == 0, err
    assert "the negative prompt is longer than 512 tokens" in err, err
    assert "warning: the prompt is longer" not in err


# ---- output forms people share ---------------------------------------------------------------------


def test_output_to_stdout_and_prompt_from_stdin(run_package, tmp_path):
    import subprocess

    import av
    from cli_helpers import VIDRT

    done = subprocess.run([VIDRT, "run", "-m", str(run_package), "--prompt-file", "-", "-o", "-", "--seed", "3",
                           *SMALL], input=b"a red circle moving left\n", capture_output=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert list(tmp_path.iterdir()) == []  # no folder or file named "-"
    clip = tmp_path / "got.mp4"
    clip.write_bytes(done.stdout)
    assert read_metadata(clip)["prompt"] == "a red circle moving left"
    with av.open(str(clip)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 1


@pytest.mark.parametrize("name", ["still.png", "clip.gif", "clip.mkv", "clip.mov"])
def test_shareable_outputs_from_the_cli(capsys, run_package, tmp_path, name):
    out = tmp_path / name
    code, err = vidrt(capsys, "run", "-m", run_package, "-p", "a red circle", "-o", out, "--seed", "4", *SMALL)
    assert code == 0, err
    import av

    with av.open(str(out)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (32, 32, 3)
    if name != "clip.gif":  # GIF has no place for the settings
        assert read_metadata(out)["seed"] == "4"


@pytest.mark.parametrize("name", ["new.mp4/", "shots.v1/"])
def test_a_folder_path_ending_in_a_slash_is_a_png_folder_whatever_its_dots(capsys, run_package, tmp_path, name):
    """`-o new.mp4/` and `-o shots.v1/`: a PNG folder of that name, as the output help says (tester report s7
    item 8: the slash was dropped before the format was read, making an MP4 file or refusing '.v1')."""
    out = tmp_path / name.rstrip("/")
    code, err = vidrt(capsys, "run", "-m", run_package, "-p", "a red circle", "-o", f"{tmp_path}/{name}", "--seed",
                      "4", *SMALL)
    assert code == 0, err
    assert out.is_dir() and (out / "frame_000000.png").is_file(), sorted(p.name for p in tmp_path.iterdir())
    assert read_metadata(out)["seed"] == "4"


def test_png_still_of_a_many_frame_clip_is_refused_before_work(capsys, run_package, tmp_path):
    out = tmp_path / "still.png"
    assert_error(*vidrt(capsys, "run", "-m", run_package, "-p", "a red circle", "-o", out, "--frames", "5", "-q",
                        "--steps", "1", "--size", "32x32"), 2, "--frames 1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix, crf, ok", [(".mp4", 0, False), (".mp4", 51, True), (".mp4", 52, False),
                                             (".webm", 63, True), (".gif", 18, False)])
def test_crf_is_checked_per_codec_before_any_work(capsys, run_package, tmp_path, suffix, crf, ok):
    out = tmp_path / f"a{suffix}"
    code, err = vidrt(capsys, "run", "-m", run_package, "-p", "a red circle", "-o", out, "--crf", crf, *SMALL)
    if ok:
        assert code == 0, err
    else:
        assert_error(code, err, 2, "--crf")
        assert list(tmp_path.iterdir()) == []


def test_info_shows_the_default_negative_prompt(capsys, run_package):
    from vidrt.package.manifest import load_manifest

    code = 0
    try:
        from vidrt.cli import main

        main(["info", str(run_package)])
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr().out
    negative = load_manifest(run_package, verify=False).model.sampling.negative_prompt
    assert code == 0 and "negative" in out and (negative or "(none)") in out

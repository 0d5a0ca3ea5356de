"""vidrt batch and vidrt serve on a private local Ray (2 CPUs, 200 MB object store) with a tiny package.

Order matters and is the file's order: the batch tests run first (their workers are gone when
run_batch returns), then the server starts once for the rest. Every wait is bounded and says what
it was waiting for; nothing asserts on timings.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from cli_helpers import free_port, read_only_mount  # noqa: E402
from vidrt.cli.app import cli, main  # noqa: E402
from vidrt.errors import UsageError  # noqa: E402
from vidrt.service.jobs import JobRequest, execute_job  # noqa: E402
from vidrt.video import read_metadata  # noqa: E402

# crf 1: the best browser-playable H.264 (crf 0, lossless, is refused: High 4:4:4 Predictive). Same frames and
# settings -> the same bytes (x264 is deterministic at any thread count), so decoded frames compare exactly.
SMALL = {"size": "64x64", "frames": 9, "steps": 4, "crf": 1}
LONG = {"prompt": "a red cat walks on the beach", "size": "128x128", "frames": 17, "steps": 400, "seed": 5, "crf": 1}


# ---- fixtures ----------------------------------------------------------------------------------


def _package_in(value: Any) -> Path | None:
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, (str, Path)) and (Path(v) / "manifest.json").is_file():
            return Path(v)
    return None


@pytest.fixture(scope="module")
def package(request, tmp_path_factory) -> Path:
    """The shared tiny t2v package (conftest's tiny_t2v_package) or, without it, one built here."""
    try:
        found = _package_in(request.getfixturevalue("tiny_t2v_package"))
        if found is not None:
            return found
    except pytest.FixtureLookupError:
        pass
    from tiny import write_diffusers_checkpoint
    from vidrt.export.package import export_package

    root = tmp_path_factory.mktemp("scaleout-ckpt")
    write_diffusers_checkpoint(root, "t2v")
    return Path(export_package(root, root / "package", variant="wan2.1-t2v-1.3b", progress=False))


@pytest.fixture(scope="module")
def local_ray():
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(package, local_ray, tmp_path_factory):
    from vidrt.service import server as srv

    out = tmp_path_factory.mktemp("served")
    config = srv.ServeConfig(package=str(package), out_dir=str(out), workers=2, threads=1, max_steps=400,
                             max_frames=17, max_pixels=128 * 128)
    service = srv.Service(config, host="127.0.0.1", port=free_port())
    url = service.start_in_thread()
    yield url, out
    service.stop()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def get(url: str) -> dict[str, Any]:
    r = requests.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def finished(url: str, vid: str, timeout: float = 120.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        v = get(f"{url}/v1/videos/{vid}")
        return v if v["status"] not in ("queued", "in_progress") else None

    return wait_for(f"video {vid} to finish", check, timeout)


def decode(path: str | os.PathLike[str]) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def cli_run(package: Path, job: dict[str, Any], out: Path) -> np.ndarray:
    """`vidrt run` with the same request (one ONNX Runtime thread, like the workers)."""
    args = ["run", "--model", str(package), "--prompt", job["prompt"], "--size", job["size"], "--frames",
            str(job["frames"]), "--steps", str(job["steps"]), "--seed", str(job.get("seed", 0)), "--threads", "1",
            "--crf", str(job["crf"]),
            "-o", str(out), "--quiet"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return decode(out)


# ---- jobs contract -----------------------------------------------------------------------------


def _batch_exit(capsys, jobs: Path, package: str, out: Path) -> tuple[int, str]:
    """`vidrt batch JOBS --out OUT --model PACKAGE` in this process, refused: (exit code, stderr stripped)."""
    with pytest.raises(SystemExit) as exit_:
        main(["batch", str(jobs), "--out", str(out), "--model", str(package)])
    return exit_.value.code, capsys.readouterr().err.strip()

def test_job_request_checks_types():
    job = JobRequest.from_dict({"prompt": "a cat", "size": "64x64", "steps": 3, "guidance": 4}, where="line 2")
    assert job.guidance == 4.0 and job.to_request().width == 64
    assert job.key() == JobRequest.from_dict(job.to_dict()).key()
    for bad, needle in (({"prompt": "a", "steps": "3"}, "steps must be an integer"),
                        ({"prompt": "a", "steps": True}, "steps must be an integer"),
                        ({"prompt": "a", "stepz": 3}, "unknown field 'stepz'"),
                        ({"steps": 3}, "missing \"prompt\""), ([1], "expected a JSON object"),
                        ({"prompt": "a", "size": "64by64"}, "not WIDTHxHEIGHT"),
                        ({"prompt": "a", "output_format": "gif"}, "output_format 'gif'")):
        with pytest.raises(UsageError, match=needle) as err:
            JobRequest.from_dict(bad, where="line 2")
        assert str(err.value).startswith("line 2: ") or "WIDTHxHEIGHT" in str(err.value)
        assert "\n" not in str(err.value)


def test_cancel_between_steps_writes_nothing(package, tmp_path):
    from vidrt.errors import Cancelled
    from vidrt.pipeline import Pipeline

    pipe = Pipeline.load(package, threads=1)
    events = []
    out = tmp_path / "clip.mp4"
    with pytest.raises(Cancelled):
        execute_job(pipe, JobRequest(prompt="a cat", **SMALL), out, on_event=events.append,
                    should_stop=lambda: len(events) >= 2)
    assert [e.stage for e in events] == ["denoise", "denoise"] and events[-1].done == 2
    assert list(tmp_path.iterdir()) == []  # no clip, no temp
    result = execute_job(pipe, JobRequest(prompt="a cat", **SMALL), out, on_event=events.append)
    assert result.path == out.absolute() and events[-1].stage == "done" and events[-1].percent == 100.0


# ---- vidrt batch -------------------------------------------------------------------------------


def test_batch_bad_line_names_it(package, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    for text, needle in (('{"prompt": "a cat"}\n\n{"prompt": "a dog", "size": "65x64"}\n',
                          "jobs.jsonl line 3: width 65 is not a multiple of 16"),
                         ('{"prompt": "a cat"}\n{"prompt": "a dog",\n', "jobs.jsonl line 2: not JSON"),
                         ('{"prompt": "a cat", "steps": 2.5}\n', "jobs.jsonl line 1: steps must be an integer"),
                         ('{"prompt": "a", "output": "x"}\n{"prompt": "b", "output": "x.mp4"}\n',
                          "jobs.jsonl line 2: writes x.mp4, like line 1"),
                         # every bad line at once, in one line
                         ('{"prompt": "a", "steps": 0}\n{"prompt": "b"}\nnope\n{"prompt": "c", "size": "65x64"}\n',
                          "3 bad lines: jobs.jsonl line 1: steps 0 is out of range; use 1..1000; jobs.jsonl line 3: "
                          "not JSON (Expecting value at column 1); jobs.jsonl line 4: width 65 is not a multiple of "
                          "16"),
                         # a malformed LoRA strength or size is named with its line like any other field
                         # a recipe made for the user's own LoRA, without one: refused as `vidrt run` refuses it
                         ('{"prompt": "a", "recipe": "lightx2v-4step"}\n',
                          "jobs.jsonl line 1: recipe lightx2v-4step is made for a distillation LoRA"),
                         ('{"prompt": "a"}\n{"prompt": "b", "loras": ["x.safetensors:abc"]}\n'
                          '{"prompt": "c", "size": "big"}\n',
                          "2 bad lines: jobs.jsonl line 2: loras x.safetensors:abc: strength 'abc' is not a finite "
                          "number; the form is FILE[:STRENGTH], e.g. loras style.safetensors:0.8; jobs.jsonl line 3: "
                          "size 'big' is not WIDTHxHEIGHT")):
        jobs.write_text(text)
        code, err = _batch_exit(capsys, jobs, package, tmp_path / "out")
        assert code == 2 and err == f"error: {err[7:]}" and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_batch_damaged_lora_is_refused_before_any_work(package, tmp_path, capsys, monkeypatch):
    """A line's LoRA is read as `vidrt run --lora` reads it before Ray starts (exit 2, the line named); clips
    that still fail while running exit 4 (runtime) with a hint that does not promise a retry fixes them."""
    from safetensors.numpy import save_file

    q = "diffusion_model.blocks.0.self_attn.q"
    nan = tmp_path / "nan.safetensors"
    save_file({f"{q}.lora_down.weight": np.full((4, 64), np.nan, np.float32),
               f"{q}.lora_up.weight": np.ones((64, 4), np.float32)}, str(nan))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": "a dog", "loras": [str(nan)]}))
    code, err = _batch_exit(capsys, jobs, package, tmp_path / "out")
    assert code == 2 and "\n" not in err, err
    assert f"jobs.jsonl line 2: loras {nan}: tensor {q}.lora_down.weight holds NaN or Inf" in err, err
    assert not (tmp_path / "out").exists()
    # readable files that do not fit the DiT: another architecture's keys, another model size's shapes
    # (LoraMerger's key/shape check from the header, before Ray starts: exit 2, each line named)
    sdxl, wide = tmp_path / "sdxl.safetensors", tmp_path / "wide.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((4, 320), np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.ones((320, 4), np.float32)},
              str(sdxl))
    save_file({f"{q}.lora_down.weight": np.ones((4, 7), np.float32),
               f"{q}.lora_up.weight": np.ones((7, 4), np.float32)}, str(wide))
    jobs.write_text("\n".join(json.dumps(x) for x in (
        {"prompt": "a cat"}, {"prompt": "a dog", "loras": [str(sdxl)]},
        {"prompt": "a cow", "loras": [f"{wide}:0.5"]}, {"prompt": "a hen", "loras": [f"{wide}:0"]},
        {"prompt": "a pig", "loras": [f"dit_high={wide}"]})))
    code, err = _batch_exit(capsys, jobs, package, tmp_path / "out")
    assert code == 2 and "\n" not in err and err.startswith("error: 4 bad lines: "), err
    # a per-expert LoRA on a one-denoiser model: the line's own field, not `vidrt run`'s flag
    assert f"jobs.jsonl line 5: loras {wide} is for expert dit_high, this model has dit; a LoRA on a " \
        f"one-denoiser model is for every expert: name it in loras without \"dit_high=\"" in err, err
    assert f"jobs.jsonl line 2: loras {sdxl} is not a LoRA for this Wan DiT" in err, err
    assert f"jobs.jsonl line 3: loras {wide} does not fit this model: blocks.0.attn1.to_q.weight needs" in err, err
    assert f"jobs.jsonl line 4: loras {wide} does not fit" in err, err
    assert not (tmp_path / "out").exists()

    import vidrt.service.batch

    monkeypatch.setattr(vidrt.service.batch, "run_batch", lambda *a, **k: {"clips": 2, "failed": [{"line": 1}]})
    jobs.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    code, err = _batch_exit(capsys, jobs, package, tmp_path / "out")
    assert code == 4 and "1 of 2 clips failed" in err and "finished clips are skipped" in err, err


def test_batch_lora_twice_is_refused_before_ray(package, tmp_path, capsys):
    """A line naming one LoRA file twice, or two byte-identical files, would be refused by every worker's merge
    (LoraMerger.applied): it is refused before Ray starts instead (exit 2, the line named)."""
    import shutil

    from safetensors.numpy import save_file
    from vidrt.package.manifest import load_manifest

    width = load_manifest(package, verify=False).components["dit"].weights["blocks.0.attn1.to_q.weight"].shape[0]
    q = "diffusion_model.blocks.0.self_attn.q"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({f"{q}.lora_down.weight": np.ones((4, width), np.float32),
               f"{q}.lora_up.weight": np.ones((width, 4), np.float32)}, str(a))
    shutil.copy(a, b)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(x) for x in (
        {"prompt": "a cat", "loras": [f"{a}:0.5"]}, {"prompt": "a dog", "loras": [f"{a}:0.5", f"{b}:0.5"]})))
    code, err = _batch_exit(capsys, jobs, package, tmp_path / "out")
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"error: jobs.jsonl line 2: loras {b} is the same file as loras {a}"), err
    assert not (tmp_path / "out").exists()


def test_batch_resume_follows_a_lora_files_contents(package, tmp_path):
    """A clip made with a LoRA is done only while that file holds what it held: rewrite the file under the
    same name and the line is made again (its request key holds the file's sha256), named or not."""
    from safetensors.numpy import save_file
    from vidrt.package.manifest import load_manifest
    from vidrt.service.batch import is_done, read_jobs

    manifest = load_manifest(package, verify=False)
    width = manifest.components["dit"].weights["blocks.0.attn1.to_q.weight"].shape[0]
    q = "diffusion_model.blocks.0.self_attn.q"
    lora = tmp_path / "style.safetensors"

    def write_lora(value: float) -> None:
        save_file({f"{q}.lora_down.weight": np.full((4, width), value, np.float32),
                   f"{q}.lora_up.weight": np.ones((width, 4), np.float32)}, str(lora))

    write_lora(0.1)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat", "loras": [f"{lora}:0.5"]}) + "\n" +
                    json.dumps({"prompt": "a dog", "loras": [str(lora)], "output": "dog"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    lines = read_jobs(jobs, manifest.model, package, out)
    for line in lines:  # as a finished run leaves them: the clip and (named) its stats with the request key
        line.output.write_bytes(b"a clip")
        line.stats_path.write_text(json.dumps({"request_key": line.key}))
    assert all(is_done(b) for b in read_jobs(jobs, manifest.model, package, out))
    write_lora(0.2)  # same name, same size, other contents
    again = read_jobs(jobs, manifest.model, package, out)
    assert [is_done(b) for b in again] == [False, False]
    assert again[0].output != lines[0].output and again[1].output == lines[1].output


def test_batch_resume_follows_the_package_and_the_start_image(baked_package, tmp_path):
    """Another model package is another request, even one that keeps the model's name (a LoRA baked in by
    `vidrt export --lora`), and so is a start image whose file was rewritten under the same name: a clip
    made from the old one is made again, named or not."""
    import shutil

    from PIL import Image
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.service.batch import is_done, read_jobs

    bundled, baked = Path(default_package()), baked_package[0]
    spec, baked_spec = (load_manifest(p, verify=False).model for p in (bundled, baked))
    assert spec.name == baked_spec.name and spec.image is not None
    image = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red circle moving left", "seed": 1, "output": "c1"}) + "\n" +
                    json.dumps({"prompt": "a red circle moving left", "seed": 1}) + "\n" +
                    json.dumps({"prompt": "a red circle", "image": str(image), "output": "i1"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    lines = read_jobs(jobs, spec, bundled, out)
    for line in lines:  # as a finished run leaves them
        line.output.write_bytes(b"a clip")
        line.stats_path.write_text(json.dumps({"request_key": line.key}))
    assert all(is_done(b) for b in read_jobs(jobs, spec, bundled, out))
    assert [is_done(b) for b in read_jobs(jobs, baked_spec, baked, out)] == [False, False, False]
    engines = tmp_path / "with-engines"  # TensorRT engines built later do not change what the graphs make
    shutil.copytree(bundled, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["engines"] = [{"component": "dit", "precision": "fp16", "tensorrt_version": "10.13",
                            "compute_capability": "8.9", "artifact": {**manifest["components"]["dit"]["artifact"],
                                                                      "file": "dit.sm89.engine"}}]
    (engines / "manifest.json").write_text(json.dumps(manifest))
    assert [b.key for b in read_jobs(jobs, spec, engines, out)] == [b.key for b in lines]
    Image.new("RGB", (64, 64), (30, 200, 30)).save(image)  # same name, other pixels
    assert [is_done(b) for b in read_jobs(jobs, spec, bundled, out)] == [True, True, False]


def test_batch_never_replaces_a_file_it_did_not_make(package, tmp_path, capsys, monkeypatch):
    """A file at a line's output (or its stats path) with no stats JSON of vidrt batch's beside it is the
    user's: refused before any work (exit 5, every such file named), replaced only with --overwrite."""
    import vidrt.service.scaleout as scaleout

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.mp4").write_text("precious")
    (out / "notes.json").write_text("{}")  # a stats path: a JSON the user wrote, no request_key
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a red circle moving left", "seed": 1, "output": "mine"}\n'
                    '{"prompt": "a blue square", "output": "notes"}\n{"prompt": "a cat", "output": "new"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["batch", str(jobs), "--out", str(out), "--model", str(package), "-q"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 5 and "\n" not in err, err
    assert err.startswith("error: --out") and "mine.mp4 (line 1), notes.json (line 2), not made by vidrt batch; " \
        "pass --overwrite" in err, err
    assert (out / "mine.mp4").read_text() == "precious" and (out / "notes.json").read_text() == "{}"

    class RayStarts(Exception):
        pass

    def no_ray(*a: Any) -> bool:
        raise RayStarts()

    monkeypatch.setattr(scaleout, "connect_ray", no_ray)  # what happens before the workers start is the test
    with pytest.raises(SystemExit) as exit_:
        main(["batch", str(jobs), "--out", str(out), "--model", str(package), "-q", "--overwrite"])
    assert exit_.value.code == 1 and "RayStarts" in capsys.readouterr().err
    assert not (out / "mine.mp4").exists()  # replaced: removed first, then made (by the workers)


def test_batch_overwrite_keeps_run_s_rule_and_names_what_it_replaces(package, tmp_path, capsys, monkeypatch):
    """--overwrite replaces what `vidrt run --overwrite` would (video.check_replaceable): a folder of the
    user's files at a PNG-folder line, or a folder at a file line, is refused before anything is removed;
    the message names every file a line replaces, its stats JSON too."""
    import vidrt.service.scaleout as scaleout

    out = tmp_path / "out"
    (out / "holiday").mkdir(parents=True)
    (out / "holiday" / "photo.jpg").write_text("precious")
    (out / "one.mp4").mkdir()
    (out / "one.mp4" / "precious.txt").write_text("precious")
    (out / "two.mp4").write_text("mine")
    (out / "two.json").write_text("{}")
    jobs = tmp_path / "jobs.jsonl"
    cases = [('{"prompt": "a", "output": "holiday", "output_format": "png"}\n',
              "holiday exists and is not a vidrt PNG frame folder; refusing to replace it"),
             ('{"prompt": "a", "output": "one"}\n', "one.mp4 is a folder; give a file path"),
             ('{"prompt": "a", "output": "three"}\n',
              "three.json is a folder, where the line's stats JSON goes; refusing")]
    (out / "three.json").mkdir()
    for text, needle in cases:
        jobs.write_text('{"prompt": "b", "output": "two"}\n' + text)
        with pytest.raises(SystemExit) as exit_:
            main(["batch", str(jobs), "--out", str(out), "--model", str(package), "-q", "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 5 and needle in err and "\n" not in err, err
        assert err.startswith("error: line 2: "), err
    assert (out / "holiday" / "photo.jpg").read_text() == "precious"
    assert (out / "one.mp4" / "precious.txt").read_text() == "precious"
    assert (out / "two.mp4").read_text() == "mine" and (out / "two.json").read_text() == "{}"

    class RayStarts(Exception):
        pass

    def no_ray(*a: Any) -> bool:
        raise RayStarts()

    monkeypatch.setattr(scaleout, "connect_ray", no_ray)
    jobs.write_text('{"prompt": "b", "output": "two"}\n')
    with pytest.raises(SystemExit):
        main(["batch", str(jobs), "--out", str(out), "--model", str(package), "-q", "--overwrite"])
    assert "line 1: replacing two.mp4 and two.json (--overwrite)" in capsys.readouterr().err
    assert not (out / "two.mp4").exists() and not (out / "two.json").exists()


def test_batch_refuses_two_lines_that_share_a_file_and_reads_a_bom(package, tmp_path, capsys):
    """Two lines whose clips differ only by suffix share one stats file (NAME.json), and a line named
    batch-summary would be overwritten by the run's summary: each resume would remake one of them, so the
    file is refused before any work. A UTF-8 BOM (Windows editors) is not part of line 1."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.batch import read_jobs

    jobs = tmp_path / "jobs.jsonl"
    for text, needle in (('{"prompt": "a", "output": "same"}\n{"prompt": "b", "output": "same", '
                          '"output_format": "webm"}\n', "jobs.jsonl line 2: writes same.json, like line 1"),
                         ('{"prompt": "a", "output": "batch-summary"}\n',
                          "jobs.jsonl line 1: writes batch-summary.json, which is the batch's summary file; give the "
                          "line another \"output\" name")):
        jobs.write_text(text)
        code, err = _batch_exit(capsys, jobs, package, tmp_path / "out")
        assert code == 2 and needle in err and "\n" not in err, err
    jobs.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a cat", "output": "cat"}\n')
    spec = load_manifest(package, verify=False).model
    lines = read_jobs(jobs, spec, package, tmp_path / "out")
    assert [(b.line, b.job.prompt, b.output.name) for b in lines] == [(1, "a cat", "cat.mp4")]
    # a BOM on a later line (two files joined): named in plain words, not Python's "decode using utf-8-sig"
    jobs.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a cat"}\n' + b"\xef\xbb\xbf" + b'{"prompt": "a dog"}\n')
    with pytest.raises(UsageError) as info:
        read_jobs(jobs, spec, package, tmp_path / "out")
    assert str(info.value).startswith("jobs.jsonl line 2: starts with a byte order mark") and \
        "utf-8-sig" not in str(info.value), info.value


def test_batch_out_on_a_read_only_mount_is_an_output_error(package, tmp_path, capsys):
    """An --out that cannot be written (here a read-only mount, even for root) is an output error, exit 5,
    with the system's reason, before Ray starts: vidrt batch, and vidrt serve's start checks."""

    from vidrt.errors import OutputError
    from vidrt.service.server import ServeConfig, check_config

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat"}\n')
    with read_only_mount(tmp_path) as mnt:  # read-only even for root: a folder to create in it, and the mount itself
        for out in (mnt / "b", mnt):
            with pytest.raises(SystemExit) as exit_:
                main(["batch", str(jobs), "--out", str(out), "--model", str(package)])
            err = capsys.readouterr().err.strip()
            assert exit_.value.code == 5 and err == f"error: cannot write in --out {out} (Read-only file system); " \
                "give a folder you can write to", err
            with pytest.raises(OutputError, match=f"cannot write in --out {out} .Read-only file system"):
                check_config(ServeConfig(package=str(package), out_dir=str(out)))  # vidrt serve, before Ray


def test_batch_stops_on_a_ctrl_c_swallowed_while_ray_starts(package, tmp_path, capsys, monkeypatch):
    """Python ignores a KeyboardInterrupt raised in an at-fork callback (Ray forking its processes): the
    signal is recorded (vidrt.cli.app), and vidrt batch checks it once Ray is up, as vidrt serve does, so it
    stops with 130 instead of making every clip."""
    import signal as signals

    import vidrt.cli.app as app
    import vidrt.service.batch as batch
    import vidrt.service.scaleout as scaleout

    monkeypatch.setattr(app, "_signal_received", None)
    monkeypatch.setattr(signals, "signal", lambda *a: None)  # main() leaves pytest's handlers alone

    def ray_start_swallowing_a_ctrl_c(*a: Any) -> bool:
        app._signal_received = signals.SIGINT  # what app._on_sigint records before its raise is lost
        return False

    drove: list[int] = []

    async def drive(*a: Any) -> None:
        drove.append(1)

    monkeypatch.setattr(scaleout, "connect_ray", ray_start_swallowing_a_ctrl_c)
    monkeypatch.setattr(batch, "_drive", drive)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(package), "-q"])
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert drove == [] and not (tmp_path / "out" / "batch-summary.json").exists()


def test_a_ctrl_c_while_the_private_ray_starts_ends_what_it_started(monkeypatch):
    """ray.init interrupted part-way (a Ctrl-C while vidrt batch / serve start their private Ray) is followed
    by ray.shutdown(), which ends the processes it had started, before the interrupt goes on."""
    from vidrt.service import scaleout

    calls: list[str] = []

    def init(**kwargs: Any) -> None:
        calls.append("init")
        raise KeyboardInterrupt()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with pytest.raises(KeyboardInterrupt):
        scaleout.connect_ray(None, "batch")
    assert calls == ["init", "shutdown"]


def test_package_identity_is_what_makes_the_clips(tmp_path):
    """The resume identity of a package: its graphs, weights, defaults... not the export's bookkeeping (the
    checkpoint files' mtimes in export_inputs differ between two byte-identical exports) nor TensorRT engines."""
    import shutil

    from vidrt.models import default_package
    from vidrt.service.jobs import package_identity

    shipped = default_package()
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["export_inputs"] = {k: "0" * 64 for k in raw["export_inputs"]}
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert package_identity(copy) == package_identity(shipped)
    raw["components"]["vae_decode_step"]["artifact"]["sha256"] = "1" * 64  # another graph: another package
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert package_identity(copy) != package_identity(shipped)


def test_batch_runs_and_resumes(package, local_ray, tmp_path):
    from vidrt.service.batch import run_batch
    from vidrt.service.jobs import package_identity

    identity = package_identity(package)

    lines = [{"prompt": "a red cat walks", **SMALL, "seed": 1},
             {"prompt": "a blue dog runs", **SMALL, "seed": 2, "output": "dog"},
             {"prompt": "a cat in snow", **{k: v for k, v in SMALL.items() if k != "crf"}, "seed": 3,
              "output_format": "png"},  # PNG frames have no CRF
             {"prompt": "a dog at night", **SMALL, "seed": 4, "output_format": "webm"}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    messages: list[str] = []
    summary = run_batch(str(jobs), str(out), package, workers=2, threads=1, quiet=True, echo=messages.append)
    assert summary["completed"] == 4 and summary["failed"] == [] and summary["workers"] == 2, summary
    assert summary["clips_per_hour"] > 0 and "4 made" in messages[-1]
    dog = out / "dog.mp4"
    assert decode(dog).shape == (9, 64, 64, 3)
    assert json.loads((out / "dog.json").read_text())["settings"]["seed"] == 2
    png = out / JobRequest.from_dict(lines[2]).key(identity)
    assert len(list(png.glob("frame_*.png"))) == 9
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temps left
    mtime = dog.stat().st_mtime_ns
    dog_frames = decode(dog)

    # resumable: a second run skips everything that exists; a removed clip is made again
    (out / (JobRequest.from_dict(lines[0]).key(identity) + ".mp4")).unlink()
    again = run_batch(str(jobs), str(out), package, workers=1, threads=1, quiet=True, echo=messages.append)
    assert (again["skipped"], again["completed"]) == (3, 1), again
    assert dog.stat().st_mtime_ns == mtime
    # resumable by request, not by name: a named line whose prompt changed is made again, the rest skipped
    lines[1]["prompt"] = "a green dog runs"
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    third = run_batch(str(jobs), str(out), package, workers=1, threads=1, quiet=True, echo=messages.append)
    assert (third["skipped"], third["remade"], third["completed"]) == (3, 1, 1), third
    assert any("line 2: dog.mp4 was made from another request" in m for m in messages), messages
    record = json.loads((out / "dog.json").read_text())
    assert record["settings"]["prompt"] == "a green dog runs" and record["request_key"] == \
        JobRequest.from_dict({k: v for k, v in lines[1].items() if k != "output"}).key(identity)
    lines[1]["prompt"] = "a blue dog runs"
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (out / "dog.mp4").unlink()  # back to the first request: made again below, compared with vidrt run
    run_batch(str(jobs), str(out), package, workers=1, threads=1, quiet=True, echo=messages.append)
    dog_frames = decode(dog)
    # a batch clip is the clip `vidrt run` makes from the same request
    assert np.array_equal(dog_frames, cli_run(package, lines[1], tmp_path / "dog-run.mp4"))


def test_batch_takes_a_recipe_whose_lora_is_baked_in(baked_package, local_ray, tmp_path):
    """`vidrt batch` on a package with a distillation LoRA baked in (`vidrt export --lora`, manifest
    baked_loras): a line with recipe lightx2v-4step and no loras is accepted by the check before Ray starts
    and by the worker, as `vidrt run` accepts it (the baked LoRA fills the recipe's slot), and its clip is the
    clip `vidrt run` makes. (On a package without it, the line is refused: test_batch_bad_line_names_it.)"""
    from vidrt.service.batch import run_batch

    baked, _ = baked_package
    line = {"prompt": "a red circle moving left", "recipe": "lightx2v-4step", "size": "32x32", "frames": 1,
            "seed": 3, "crf": 1, "output": "fast"}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(line) + "\n")
    summary = run_batch(str(jobs), str(tmp_path / "out"), baked, workers=1, threads=1, quiet=True,
                        echo=lambda s: None)
    assert summary["completed"] == 1 and summary["failed"] == [], summary
    assert json.loads((tmp_path / "out" / "fast.json").read_text())["settings"]["steps"] == 4
    res = CliRunner().invoke(cli, ["run", "--model", str(baked), "--prompt", line["prompt"], "--recipe",
                                   "lightx2v-4step", "--size", "32x32", "--frames", "1", "--seed", "3",
                                   "--threads", "1", "--crf", "1", "-o", str(tmp_path / "run.mp4"), "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert np.array_equal(decode(tmp_path / "out" / "fast.mp4"), decode(tmp_path / "run.mp4"))


# ---- vidrt serve -------------------------------------------------------------------------------


def test_refuses_public_bind_without_token(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--host", "0.0.0.0", "--port", "8999"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--host 0.0.0.0 is reachable from other machines: give --token" in err


def test_token_is_checked():
    """The guard answers 401 from the headers alone, before the app (or the body) is touched."""
    import asyncio

    from vidrt.service.guard import Guard

    async def app(scope, receive, send):  # the application behind the guard
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def status_of(headers: list[tuple[bytes, bytes]], token: str | None) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            raise AssertionError("the guard read the body")

        scope = {"type": "http", "path": "/v1/videos", "headers": [(b"host", b"localhost"), *headers]}
        asyncio.run(Guard(app, token=token, allowed_hosts={"localhost"}, max_body=100)(scope, receive, send))
        return sent[0]["status"]

    assert status_of([(b"authorization", b"Bearer s3cret-s3cret-s3cret")], "s3cret-s3cret-s3cret") == 200
    assert status_of([(b"authorization", b"Bearer wrong")], "s3cret-s3cret-s3cret") == 401
    assert status_of([], "s3cret-s3cret-s3cret") == 401
    assert status_of([], None) == 200  # no token: open (loopback only)


def test_concurrent_jobs_all_finish_and_match_vidrt_run(server, package, tmp_path):
    url, _ = server
    jobs = [{"prompt": p, **SMALL, "seed": s} for p, s in
            (("a red cat walks", 1), ("a blue dog runs", 2), ("a cat on the beach", 3), ("a dog in the city", 4))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda j: requests.post(f"{url}/v1/videos", json=j, timeout=30), jobs))
    assert [r.status_code for r in replies] == [200] * len(jobs), [r.text for r in replies]
    videos = [r.json() for r in replies]
    assert len({v["id"] for v in videos}) == len(jobs)
    assert all(v["object"] == "video" and v["status"] in ("queued", "in_progress") and v["size"] == "64x64"
               for v in videos)
    for job, v in zip(jobs, videos, strict=True):
        done = finished(url, v["id"])
        assert done["status"] == "completed" and done["progress"] == 100, done
        assert done["stats"]["seconds"]["denoise"] > 0
        content = requests.get(f"{url}/v1/videos/{v['id']}/content", timeout=30)
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        served = tmp_path / f"{v['id']}.mp4"
        served.write_bytes(content.content)
        ours = cli_run(package, job, tmp_path / f"run-{v['id']}.mp4")
        assert np.array_equal(decode(served), ours), f"{v['id']}: served clip differs from vidrt run's"
        assert read_metadata(served) == read_metadata(tmp_path / f"run-{v['id']}.mp4")
    listed = get(f"{url}/v1/videos?limit=100")["data"]
    assert {v["id"] for v in videos} <= {v["id"] for v in listed}


def test_malformed_requests_get_4xx_and_server_stays_up(server):
    url, _ = server
    bad = [({"prompt": ""}, "prompt"), ({"prompt": "x", "size": "65x64"}, "size 65x64 is not a multiple of 16"),
           ({"prompt": "x", "bogus": 1}, "unknown field"), ({"prompt": "x", "steps": "many"}, "steps"),
           ({"prompt": "x", "size": "832x480"}, "over this server's limit"),
           ({"prompt": "x", "frames": 10}, "is not 4k+1"), ({"prompt": "x", "model": "sora-2"}, "not served here"),
           ({"prompt": "x", "seconds": "1", "frames": 9}, "seconds or frames"), ([1, 2], ""), ("{nope", "JSON")]
    for body, needle in bad:
        kw = {"data": body} if isinstance(body, str) else {"json": body}
        r = requests.post(f"{url}/v1/videos", headers={"content-type": "application/json"}, timeout=30, **kw)
        assert r.status_code == 400, (body, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert needle in message and "\n" not in message, (body, message)
    assert requests.get(f"{url}/v1/videos/video_nope", timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/videos/video_nope/content", timeout=30).status_code == 404
    assert requests.delete(f"{url}/v1/videos/video_nope", timeout=30).status_code == 404
    assert get(f"{url}/health")["status"] == "ok"
    spec = get(f"{url}/openapi.json")
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content"} <= set(spec["paths"])


def _submit_long(url: str) -> str:
    r = requests.post(f"{url}/v1/videos", json=LONG, timeout=30)
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    wait_for(f"{vid} to be denoising", lambda: (get(f"{url}/v1/videos/{vid}").get("step") or 0) >= 1, 120, 0.05)
    return vid


def _worker_of(url: str, vid: str) -> dict[str, Any] | None:
    return next((w for w in get(f"{url}/v1/workers")["data"] if w["job"] == vid), None)


def test_cancel_stops_a_running_job_and_frees_its_worker(server):
    url, out = server
    vid = _submit_long(url)
    worker = _worker_of(url, vid)
    assert worker is not None
    r = requests.post(f"{url}/v1/videos/{vid}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["error"]["code"] == "cancelled", r.text
    wait_for(f"worker {worker['index']} to let go of {vid}", lambda: _worker_of(url, vid) is None, 60)
    v = get(f"{url}/v1/videos/{vid}")
    assert v["status"] == "failed" and v["error"]["code"] == "cancelled" and v["completed_at"] is not None, v
    assert requests.get(f"{url}/v1/videos/{vid}/content", timeout=30).status_code == 409
    assert not list(out.glob(f"{vid}.*")), "a cancelled job left a file"
    # the worker is free again: new jobs complete (with two workers, two jobs keep both busy)
    ids = [requests.post(f"{url}/v1/videos", json={"prompt": "a cat", **SMALL, "seed": s}, timeout=30).json()["id"]
           for s in (7, 8)]
    assert [finished(url, i)["status"] for i in ids] == ["completed", "completed"]
    w = next(w for w in get(f"{url}/v1/workers")["data"] if w["index"] == worker["index"])
    assert w["alive"] and w["deaths"] == 0


def test_killed_worker_job_is_retried_and_never_served_half_written(server, package, tmp_path):
    url, out = server
    vid = _submit_long(url)
    worker = _worker_of(url, vid)
    assert worker is not None and worker["pid"]
    os.kill(worker["pid"], signal.SIGKILL)

    def done_or_conflict() -> dict[str, Any] | None:
        content = requests.get(f"{url}/v1/videos/{vid}/content", timeout=30)
        v = get(f"{url}/v1/videos/{vid}")
        if content.status_code != 200:
            assert content.status_code == 409, content.text  # never a partial file
        if v["status"] == "completed":
            return v
        assert v["status"] in ("queued", "in_progress"), v
        return None

    v = wait_for(f"{vid} to complete after its worker was killed", done_or_conflict, 180, 0.2)
    assert v["attempts"] >= 2, v
    workers = get(f"{url}/v1/workers")
    dead = next(w for w in workers["data"] if w["index"] == worker["index"])
    assert dead["deaths"] >= 1 and workers["retries"] >= 1, workers
    wait_for("the killed worker to be restarted", lambda: next(
        w for w in get(f"{url}/v1/workers")["data"] if w["index"] == worker["index"])["pid"] != worker["pid"], 120)
    served = tmp_path / "served.mp4"
    served.write_bytes(requests.get(f"{url}/v1/videos/{vid}/content", timeout=30).content)

    from vidrt.pipeline import Pipeline

    ref = execute_job(Pipeline.load(package, threads=1), JobRequest.from_dict(LONG), tmp_path / "ref.mp4")
    assert np.array_equal(decode(served), decode(ref.path)), "the retried clip differs from a clean run"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left in the output folder"


def test_fuzz_openapi_finds_no_5xx(server):
    """schemathesis generates requests from /openapi.json, ones that fit the schema and ones that do not
    (derandomized, a bounded number per operation and mode); none may get a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    created: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case: Any) -> None:
                response = case.call(base_url=url, timeout=60)
                statuses[response.status_code] += 1
                assert response.status_code < 500, \
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
                if case.method == "POST" and response.status_code == 200:
                    created.append(response.json()["id"])

            try:
                check()
            except Unsatisfiable:  # negative mode on an operation without parameters: nothing to break
                assert mode == GenerationMode.NEGATIVE
    for vid in created:  # keep the workers free for whatever runs next
        requests.delete(f"{url}/v1/videos/{vid}", timeout=30)
    print(f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert statuses[400] >= 20 and statuses[404] >= 10 and statuses[200] >= 10, statuses
    assert get(f"{url}/health")["status"] == "ok"

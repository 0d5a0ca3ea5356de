"""The public Python API (`from vidrt import Pipeline`), per-expert guidance, and the rooms' layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "runtime"


def test_pipeline_load_runs_the_bundled_model_and_saves_a_playable_file(tmp_path):
    import vidrt

    pipe = vidrt.Pipeline.load()
    result = pipe("a red circle moving left", size="64x64", num_frames=9, steps=4, seed=5)
    assert isinstance(result, vidrt.Result)
    assert result.frames.dtype == np.uint8 and result.frames.shape == (9, 64, 64, 3)
    assert result.settings.seed == 5 and result.settings.steps == 4 and result.fps == 8
    assert result.stats.seconds["denoise"] > 0

    path = result.save(tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        assert container.metadata["title"] == "a red circle moving left"  # the settings travel with the file
        assert json.loads(container.metadata["comment"])["seed"] == "5"
        rate = stream.average_rate
    assert decoded.shape == result.frames.shape and rate == 8
    mse = np.mean((decoded.astype(np.float64) - result.frames) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 30  # H.264 at CRF 18 of the same frames
    with pytest.raises(vidrt.errors.OutputError, match="exists"):
        result.save(path)  # nothing is replaced without overwrite=True


def test_saved_files_name_the_recipe_and_the_loras_without_their_folders(tmp_path):
    """Result.save records the recipe and every LoRA of the clip (the pipeline's, then the request's) by
    file name and strength; a GIF keeps the same metadata as an mp4."""
    from safetensors.numpy import save_file
    from vidrt import Pipeline, Request
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.video import read_metadata

    q = "diffusion_model.blocks.0.self_attn.q"  # a rank-4 LoRA for the bundled model's first block
    dim = load_manifest(default_package(), verify=False).model.dit.dim
    for name, value in (("style.safetensors", 0.01), ("detail.safetensors", 0.02)):  # two files, not one twice
        save_file({f"{q}.lora_down.weight": np.full((4, dim), value, np.float32),
                   f"{q}.lora_up.weight": np.ones((dim, 4), np.float32)}, str(tmp_path / name))
    pipe = Pipeline.load(loras=[(str(tmp_path / "style.safetensors"), 0.5)], warn=lambda _: None)
    result = pipe.run(Request(prompt="a red circle moving left", width=64, height=64, num_frames=5, seed=3,
                              recipe="lightx2v-4step", loras=((str(tmp_path / "detail.safetensors"), 0.25),)))
    for name in ("clip.mp4", "clip.gif"):
        meta = read_metadata(result.save(tmp_path / name))
        assert meta["recipe"] == "lightx2v-4step" and meta["steps"] == "4", meta
        assert meta["loras"] == ["style.safetensors:0.5", "detail.safetensors:0.25"], meta
        assert str(tmp_path) not in json.dumps(meta)


def test_saved_files_record_every_setting_that_changes_the_frames(tmp_path):
    """Two clips whose frames differ have different metadata (tester report s7 item 6): an explicit
    timestep list, a step cache, a start image (by file name and the sha256 of its bytes; an array by its
    size and the sha256 of its pixels), never a folder; --stats-json and Result.settings hold the same."""
    import hashlib

    from PIL import Image
    from vidrt import Pipeline, Request
    from vidrt.video import read_metadata

    pipe = Pipeline.load(warn=lambda _: None)
    base = dict(prompt="a red circle moving left", width=32, height=32, num_frames=1, seed=3, steps=4,
                scheduler="euler")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    start = tmp_path / "start.png"
    Image.fromarray(pixels).save(start)
    variants = {"plain": {}, "timesteps": {"timesteps": (1000.0, 937.5, 600.25, 100.0)},
                "cache": {"cache": "magcache"}, "image": {"image": str(start)}, "array": {"image": pixels}}
    results = {name: pipe.run(Request(**{**base, **extra})) for name, extra in variants.items()}
    metas = {name: read_metadata(r.save(tmp_path / f"{name}.png")) for name, r in results.items()}
    assert metas["timesteps"]["timesteps"] == "1000,937.5,600.25,100" and "timesteps" not in metas["plain"]
    assert metas["cache"]["cache"].startswith("magcache") and "cache" not in metas["plain"]
    assert metas["image"]["image"] == "start.png", metas["image"]
    assert metas["image"]["image_sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    assert metas["array"]["image"] == "array 48x48"
    assert metas["array"]["image_sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert results["image"].settings.image_sha256 == metas["image"]["image_sha256"]  # one record, two views
    for name in ("timesteps", "cache", "image", "array"):
        assert not np.array_equal(results[name].frames, results["plain"].frames), name  # they change the clip
    assert str(tmp_path) not in json.dumps(metas)


def test_non_finite_noise_is_refused_up_front():
    """Caller latents with NaN/Inf are the caller's mistake: one UsageError naming `noise` before any stage
    runs, not a DeviceError about the DiT after the text encoder and the first step."""
    from vidrt import Pipeline
    from vidrt.errors import UsageError

    pipe = Pipeline.load()
    shape = pipe.manifest.model.latent_shape(64, 64, 5)
    events: list[tuple[str, int, int]] = []
    for bad in (np.nan, np.inf):
        noise = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        noise[0, 0, 0, 0] = bad
        with pytest.raises(UsageError, match=r"^noise holds NaN or Inf values"):
            pipe("a red circle moving left", size="64x64", num_frames=5, steps=2, noise=noise,
                 progress=lambda *e: events.append(e))
    assert events == []


def test_messages_name_the_argument_as_the_caller_wrote_it(tmp_path, capsys):
    """The library names arguments by their Python keywords (overwrite=True, num_frames, the LoRA list);
    under `vidrt` the same refusals name its flags (CLI_FLAGS, installed for the length of a command), and
    every flag that table names exists."""
    import click
    from cli_helpers import assert_error, vidrt
    from vidrt.cli.app import CLI_FLAGS, cli
    from vidrt.errors import OutputError, UsageError, arg
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.request import Request, missing_recipe_lora, resolve
    from vidrt.video import write_video

    clip = [np.zeros((1, 16, 16, 3), np.uint8)]
    path = write_video(tmp_path / "a.mp4", clip, fps=8)
    with pytest.raises(OutputError, match=r"already exists; choose another path or pass overwrite=True$"):
        write_video(path, clip, fps=8)
    spec = load_manifest(default_package(), verify=False).model
    with pytest.raises(UsageError, match=r"^num_frames=18 is not 4k\+1; use 17 or 21$"):
        resolve(Request(prompt="a cat", num_frames=18), spec)
    assert missing_recipe_lora("lightx2v-4step", spec, ()).endswith("pass loras=[('FILE', 1.0)]")
    assert_error(*vidrt(capsys, "run", "-p", "a cat", "--frames", "18", "-o", tmp_path / "b.mp4"), 2,
                 "--frames 18 is not 4k+1")
    assert arg("num_frames") == "num_frames"  # the command's spelling ended with it
    options = {o for c in cli.commands.values() for p in c.params if isinstance(p, click.Option) for o in p.opts}
    options |= {o for g in cli.commands.values() if isinstance(g, click.Group) for c in g.commands.values()
                for p in c.params if isinstance(p, click.Option) for o in p.opts}
    assert set(CLI_FLAGS.names.values()) <= options, set(CLI_FLAGS.names.values()) - options


def test_call_keywords_match_a_request_and_streaming_keeps_no_frames():
    from vidrt import Pipeline, Request
    from vidrt.errors import UsageError

    pipe = Pipeline.load()
    chunks: list[np.ndarray] = []
    events: list[tuple[str, int, int]] = []
    streamed = pipe("a blue square moving up", width=64, height=64, num_frames=5, steps=2, seed=1,
                    on_frames=chunks.append, progress=lambda *e: events.append(e))
    by_request = pipe.run(Request(prompt="a blue square moving up", width=64, height=64, num_frames=5, steps=2,
                                  seed=1))
    assert streamed.frames is None and np.array_equal(np.concatenate(chunks), by_request.frames)
    assert ("denoise", 2, 2) in events and events[-1] == ("decode", 5, 5)
    with pytest.raises(UsageError, match="streamed"):
        streamed.save("never.mp4")
    with pytest.raises(UsageError, match="not WIDTHxHEIGHT"):
        pipe("a blue square", size="64by64")
    with pytest.raises(UsageError, match="not both"):
        pipe("a blue square", size="64x64", width=64)


def test_guidance_per_expert():
    """Wan2.2 A14B: one scale per expert (official default 4.0 high-noise, 3.0 low-noise)."""
    from vidrt.errors import UsageError
    from vidrt.package.registry import get_variant
    from vidrt.request import Request, resolve

    a14b, single = get_variant("wan2.2-t2v-a14b"), get_variant("wan2.1-t2v-1.3b")

    def scales(spec, **kw):
        s = resolve(Request(prompt="x", **kw), spec)
        return s.guidance_high_noise, s.guidance_low_noise

    assert scales(a14b) == (4.0, 3.0)
    assert scales(a14b, guidance=5.0) == (5.0, 5.0)  # one scale for both, as before
    assert scales(a14b, guidance=4.5, guidance_low_noise=2.5) == (4.5, 2.5)
    assert scales(a14b, guidance_low_noise=2.0) == (4.0, 2.0)
    assert scales(single, guidance=6.0) == (6.0, 6.0)
    with pytest.raises(UsageError, match="two-expert"):
        scales(single, guidance_low_noise=3.0)
    with pytest.raises(UsageError, match="guidance_low_noise=60.0 is out of range"):
        scales(a14b, guidance_low_noise=60.0)


def test_guidance_low_noise_reaches_the_job_contract_and_the_cli(capsys):
    from cli_helpers import vidrt
    from vidrt.service.jobs import JobRequest

    job = JobRequest.from_dict({"prompt": "x", "guidance": 4, "guidance_low_noise": 2.5})
    assert job.to_request().guidance_low_noise == 2.5
    rc, err = vidrt(capsys, "run", "-p", "a red circle moving left", "--guidance-low-noise", "3", "-o", "x.mp4")
    assert rc == 2 and "two-expert" in err  # the bundled model has one denoiser


# ---- layering: what each room may import ---------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too), resolved to vidrt.*."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _room(path: Path) -> str:
    rel = path.relative_to(RUNTIME).parts
    return rel[0] if len(rel) > 1 else "pipeline"


def test_rooms_import_only_what_they_may():
    """The pipeline, the package contract and the backends never reach into the CLI or the job service;
    the package contract imports nothing of vidrt but errors; nothing in the runtime imports torch & co."""
    heavy = ("torch", "diffusers", "transformers", "onnx", "onnxscript")
    allowed_by_room = {
        "package": ("vidrt.errors", "vidrt.package"),
        # vidrt.lora: numpy weight maths over the package contract (refit casts merged weights with it)
        "backends": ("vidrt.errors", "vidrt.package", "vidrt.backends", "vidrt.vae_decode", "vidrt.lora"),
        "lora": ("vidrt.errors", "vidrt.package", "vidrt.lora"),
    }
    problems = []
    files = sorted(p for p in RUNTIME.rglob("*.py") if "models" not in p.relative_to(RUNTIME).parts[:1])
    assert len(files) > 25
    for path in files:
        room = _room(path)
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top in heavy or any(mod == h or mod.startswith(h + ".") for h in heavy):
                problems.append(f"{path.relative_to(ROOT)} imports {mod} (the runtime is torch-free)")
            if room != "cli" and mod.startswith("vidrt.export"):  # `vidrt export`/`build` load it lazily
                problems.append(f"{path.relative_to(ROOT)} ({room}) imports {mod} (torch world)")
            if not mod.startswith("vidrt.") or mod in ("vidrt.errors",):
                continue
            if room != "cli" and mod.startswith("vidrt.cli"):
                problems.append(f"{path.relative_to(ROOT)} ({room}) imports {mod}: nothing imports the CLI")
            if room not in ("cli", "service") and mod.startswith("vidrt.service"):
                problems.append(f"{path.relative_to(ROOT)} ({room}) imports {mod}: the pipeline never needs "
                                f"the job service")
            allowed = allowed_by_room.get(room)
            if allowed and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                problems.append(f"{path.relative_to(ROOT)} ({room}) imports {mod}")
    assert problems == [], "\n".join(problems)


def test_the_layering_check_sees_a_violation(tmp_path):
    """The check above is only worth something if it catches a lazy import inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vidrt.service.jobs import JobRequest\n    import torch\n")
    assert {"vidrt.service.jobs", "vidrt.service.jobs.JobRequest", "torch"} <= _imports(bad)

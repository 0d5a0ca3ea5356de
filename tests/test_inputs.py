"""Python API and job inputs: every Request field type-checked with vidrt's own one-line error, and seeds
as people expect them (no seed or -1 = a random one, reported everywhere the clip's settings go)."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
from cli_helpers import SMALL, vidrt
from vidrt.errors import UsageError
from vidrt.request import FIELD_TYPES, Request
from vidrt.video import read_metadata

# field -> a value of the wrong type for it
WRONG = {"prompt": 3, "negative_prompt": b"bytes", "width": 64.0, "height": "64", "num_frames": 5.5,
         "steps": True, "guidance": "5", "guidance_low_noise": [3.0], "shift": None, "seed": 1.5,
         "scheduler": 1}


def test_every_request_field_has_a_type_in_the_one_table():
    """A field added to Request without a row in FIELD_TYPES would go unchecked: refuse that."""
    assert {f.name for f in fields(Request)} == set(FIELD_TYPES)


@pytest.mark.parametrize("name", sorted(WRONG))
def test_every_request_field_refuses_the_wrong_type(name):
    kwargs = {"prompt": "a cat", name: WRONG[name]}
    if name == "shift":  # None is every optional field's default; give shift a non-number instead
        kwargs[name] = object()
    with pytest.raises(UsageError) as info:
        Request(**kwargs)
    message = str(info.value)
    assert name in message and "\n" not in message and len(message) < 200, message


def test_numpy_scalars_are_accepted_as_plain_python_numbers():
    r = Request(prompt="a cat", width=np.int64(64), height=np.int32(64), guidance=np.float32(4.5), seed=np.uint32(7),
                shift=3)
    assert type(r.width) is int and type(r.seed) is int and type(r.guidance) is float and type(r.shift) is float
    json.dumps(r.__dict__)  # --stats-json must still serialise it
    with pytest.raises(UsageError, match="finite"):
        Request(prompt="a cat", guidance=float("nan"))


def test_python_api_reports_a_float_seed_as_a_usage_error():
    """The newcomer's case: numpy's `TypeError: SeedSequence expects int` before; vidrt's line now."""
    import vidrt

    pipe = vidrt.Pipeline.load()
    with pytest.raises(UsageError, match="seed must be an integer"):
        pipe("a red circle", seed=1.5)
    with pytest.raises(UsageError, match="size"):
        pipe("a red circle", size=64)
    with pytest.raises(UsageError, match="vae_memory"):
        pipe("a red circle", vae_memory=1.5)
    with pytest.raises(UsageError, match="noise"):
        pipe("a red circle", noise=[[0.0]])


# ---- seeds ---------------------------------------------------------------------------------------


def test_no_seed_or_minus_one_is_random_and_reported_in_the_result():
    import vidrt

    pipe = vidrt.Pipeline.load()
    small = {"size": "32x32", "num_frames": 1, "steps": 1}
    a, b, c = pipe("a red circle", **small), pipe("a red circle", **small), pipe("a red circle", seed=-1, **small)
    seeds = {a.settings.seed, b.settings.seed, c.settings.seed}
    assert len(seeds) == 3 and all(isinstance(s, int) and s >= 0 for s in seeds)
    again = pipe("a red circle", seed=a.settings.seed, **small)  # the reported seed repeats the clip
    assert np.array_equal(again.frames, a.frames)
    with pytest.raises(UsageError, match="seed"):
        Request(prompt="a cat", seed=-2)


def test_cli_without_seed_prints_and_stores_the_random_seed(capsys, run_package, tmp_path):
    seeds = []
    for i in range(2):
        out, stats = tmp_path / f"{i}.mp4", tmp_path / f"{i}.json"
        args = ["run", "-m", str(run_package), "-p", "a red circle", "-o", str(out), "--stats-json", str(stats)]
        code, err = vidrt(capsys, *args, *[a for a in SMALL if a != "-q"])
        assert code == 0, err
        meta_seed = int(read_metadata(out)["seed"])
        assert json.loads(stats.read_text())["settings"]["seed"] == meta_seed
        assert f"seed {meta_seed}" in err and f"--seed {meta_seed}" in err  # printed, with how to repeat it
        seeds.append(meta_seed)
    assert seeds[0] != seeds[1]
    out = tmp_path / "fixed.mp4"
    code, err = vidrt(capsys, "run", "-m", str(run_package), "-p", "a red circle", "-o", str(out), "--seed", "-1",
                      *SMALL)
    assert code == 0, err
    assert int(read_metadata(out)["seed"]) >= 0


def test_job_request_without_seed_draws_one_and_writes_the_seed_it_used(run_package, tmp_path):
    import vidrt
    from vidrt.service.jobs import JobRequest, execute_job

    pipe = vidrt.Pipeline.load(run_package)
    job = JobRequest.from_dict({"prompt": "a red circle", "size": "32x32", "frames": 1, "steps": 1})
    assert job.seed is None and JobRequest.from_dict({"prompt": "a", "seed": -1}).seed == -1
    result = execute_job(pipe, job, tmp_path / "a.mp4")
    assert int(read_metadata(tmp_path / "a.mp4")["seed"]) == result.settings.seed >= 0

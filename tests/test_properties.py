"""Property tests: no value of a numeric option and no manifest.json makes vidrt crash with a traceback
or leave a partial file. Most examples fail fast in validation; the ones that pass it either run a
fake pipeline (one 16x16 frame, so huge valid sizes cost nothing) or, in a few capped tests, the
real tiny package.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import USER_ERROR_CODES, copy_package, temps, vidrt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vidrt.errors import PackageError
from vidrt.package.manifest import MANIFEST_NAME, load_manifest
from vidrt.pipeline import Pipeline, Result
from vidrt.request import resolve
from vidrt.stats import RunStats
from vidrt.video import read_metadata

COMMON = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow])

ints = st.one_of(st.integers(-10, 300), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**63 - 1, 2**63]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-5, 60))
sizes = st.one_of(
    st.builds(lambda w, h: f"{w}x{h}", st.integers(-64, 5000), st.integers(-64, 5000)),
    st.builds(lambda w, h: f"{w}x{h}", st.sampled_from([0, 16, 32, 48, 4096, 4112]),
              st.sampled_from([0, 16, 32, 4096])),
    st.text(max_size=12),
)
memory = st.one_of(st.text(max_size=10), st.builds(lambda n, u: f"{n}{u}", floats.filter(math.isfinite),
                                                   st.sampled_from(["", "B", "K", "MiB", "GB", "T", "x"])))
OPTIONS = {"--size": sizes, "--frames": ints, "--steps": ints, "--guidance": floats, "--shift": floats,
           "--seed": ints, "--fps": ints, "--crf": ints, "--vae-memory": memory, "--threads": ints}
option_sets = st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys}))


def _fake_run(self, request, noise=None, on_frames=None, progress=None, vae_memory_bytes=None,
              keep_text_encoder=True):
    """Everything of Pipeline.run but the networks: settings resolved, one 16x16 frame streamed out."""
    s = resolve(request, self.manifest.model)
    if on_frames is not None:
        on_frames(np.zeros((1, 16, 16, 3), dtype=np.uint8))
    return Result(frames=None, settings=s, stats=RunStats(backend="fake"))


def _check(code: int, err: str, folder: Path, out: Path) -> None:
    assert "Traceback" not in err, err
    assert code == 0 or code in USER_ERROR_CODES, f"exit {code}: {err}"
    if code:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not out.exists()
    else:
        assert read_metadata(out)["software"] == "vidrt"  # complete, readable
    assert temps(folder) == []


def _args(opts: dict[str, object]) -> list[str]:
    return [x for k, v in opts.items() for x in (k, str(v))]


@settings(COMMON, max_examples=150)
@given(opts=option_sets)
def test_numeric_options_never_crash(capsys, monkeypatch, tiny_t2v_package, opts):
    monkeypatch.setattr(Pipeline, "run", _fake_run)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "a.mp4"
        code, err = vidrt(capsys, "run", "-q", "-m", str(tiny_t2v_package), "-p", "a cat", "-o", str(out),
                          *_args(opts))
        _check(code, err, Path(d), out)


small_real = st.fixed_dictionaries({
    "--size": st.sampled_from(["32x32", "48x32", "32x48"]), "--frames": st.sampled_from([1, 5]),
    "--steps": st.integers(1, 2), "--guidance": st.floats(0, 50), "--shift": st.floats(0.01, 100),
    "--seed": st.integers(0, 2**63 - 1), "--fps": st.integers(1, 240), "--crf": st.integers(1, 51),
    "--threads": st.integers(1, 2)})


@settings(COMMON, max_examples=6)
@given(opts=small_real)
def test_valid_small_values_run_for_real(capsys, tiny_t2v_package, opts):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "a.mp4"
        code, err = vidrt(capsys, "run", "-q", "-m", str(tiny_t2v_package), "-p", "a cat", "-o", str(out),
                          *_args(opts))
        assert code == 0, err
        _check(code, err, Path(d), out)


# ---- manifest.json -----------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(allow_nan=False),
              st.text(max_size=20), st.sampled_from(["../x", "/etc/passwd", "", ".", "float16", "dit"])),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def manifest_sandbox(tiny_t2v_package, tmp_path_factory):
    p = copy_package(tiny_t2v_package, tmp_path_factory.mktemp("manifest-sandbox") / "p")
    return p, json.loads((p / MANIFEST_NAME).read_text())


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@settings(COMMON, max_examples=150)
@given(data=json_values)
def test_random_json_manifest_is_refused_cleanly(manifest_sandbox, data):
    p, _ = manifest_sandbox
    (p / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(PackageError) as info:
        load_manifest(p)
    assert "\n" not in str(info.value)


@st.composite
def mutations(draw, raw):
    m = copy.deepcopy(raw)
    for _ in range(draw(st.integers(1, 3))):
        paths = [q for q in _paths(m) if q]
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values | st.sampled_from([0, -1, 1e308, 2, 7, "../dit.onnx"]))
    return m


@settings(COMMON, max_examples=200)
@given(data=st.data())
def test_mutated_manifest_load_never_crashes(manifest_sandbox, data):
    p, raw = manifest_sandbox
    m = data.draw(mutations(raw))
    (p / MANIFEST_NAME).write_text(json.dumps(m))
    try:
        load_manifest(p)
    except PackageError as exc:
        assert "\n" not in str(exc)


@settings(COMMON, max_examples=40)
@given(data=st.data())
def test_mutated_manifest_run_never_crashes(capsys, manifest_sandbox, data):
    """The whole `vidrt run` (real networks) on a mutated manifest: a clean refusal or a complete clip."""
    p, raw = manifest_sandbox
    m = data.draw(mutations(raw))
    (p / MANIFEST_NAME).write_text(json.dumps(m))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "a.mp4"
        code, err = vidrt(capsys, "run", "-q", "-m", str(p), "-p", "a cat", "-o", str(out),
                          "--steps", "1", "--size", "32x32", "--frames", "1")
        _check(code, err, Path(d), out)

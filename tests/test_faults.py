"""Fault injection: kill `vidrt run` (SIGINT, SIGKILL) at random points of real runs, many times.

After every kill the output path holds the old clip byte for byte, or nothing, or a complete new clip:
never a half-written one. After SIGINT no temporary is left; after SIGKILL the next run removes what
the dead run left (clean_stale_temps), and the next run succeeds.
Uses the bundled default model when this build has one, else the tiny random package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from cli_helpers import VIDRT, temps
from vidrt.video import read_metadata

KILLS = 20  # per signal
FRAMES = 9


def _args(package: Path, out: Path) -> list[str]:
    return [VIDRT, "run", "-q", "-m", str(package), "-p", "a red circle moving left", "--steps", "4",
            "--size", "48x32", "--frames", str(FRAMES), "-o", str(out), "--overwrite"]


def _complete(path: Path) -> bool:
    """A whole clip: metadata readable and every frame decodes."""
    try:
        meta = read_metadata(path)
        with av.open(str(path)) as c:
            n = sum(1 for _ in c.decode(video=0))
    except (av.FFmpegError, OSError, ValueError):
        return False
    return meta.get("software") == "vidrt" and n == FRAMES


def _run_ok(package: Path, out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(_args(package, out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _complete(out) and temps(out.parent) == []  # also: every dead run's temporaries are gone
    return time.perf_counter() - t0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_kill_at_random_points(run_package, tmp_path, sig):
    rng = np.random.default_rng(1234 + sig)
    out = tmp_path / "clip.mp4"
    duration = _run_ok(run_package, out)
    first_clip = out.read_bytes()
    outcomes: Counter[str] = Counter()
    for i in range(KILLS):
        if i % 2 == 0:  # half the runs replace a finished clip, half write a new path
            if not out.exists():
                out.write_bytes(first_clip)
        else:
            out.unlink(missing_ok=True)
        before = out.read_bytes() if out.exists() else None
        proc = subprocess.Popen(_args(run_package, out), stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.0, duration * 1.1))
        proc.send_signal(sig)
        t_sig = time.perf_counter()
        _, err = proc.communicate(timeout=30)
        stop_seconds = time.perf_counter() - t_sig
        rc = proc.returncode

        # the output path: untouched, absent, or a complete new clip
        if out.exists():
            assert out.read_bytes() == before or _complete(out), f"kill {i}: half-written {out} (rc {rc}): {err}"
        if sig == signal.SIGINT:
            if rc == 0:
                outcomes["finished before the signal"] += 1
            elif rc == 130:
                outcomes["interrupted (130)"] += 1
                assert stop_seconds < 2.0, f"kill {i}: took {stop_seconds:.1f} s to stop"
                assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
            else:  # before vidrt's own code ran (interpreter start-up): Python's default, nothing written
                assert rc in (1, -signal.SIGINT) and ("KeyboardInterrupt" in err or not err.strip()), \
                    f"kill {i}: rc {rc}: {err}"
                outcomes["during interpreter start-up"] += 1
            assert temps(tmp_path) == [], f"kill {i}: temporaries left after SIGINT: {temps(tmp_path)}"
        else:
            outcomes["finished before the signal" if rc == 0 else "killed (-9)"] += 1
            if temps(tmp_path):
                outcomes["left a temporary"] += 1
        if i % 5 == 4:  # the next run succeeds and clears what dead runs left
            _run_ok(run_package, out)
    _run_ok(run_package, out)
    print(f"{sig.name}: {dict(outcomes)}")
    assert outcomes["interrupted (130)" if sig == signal.SIGINT else "killed (-9)"] >= KILLS // 2


def test_stale_temporaries_of_dead_runs_are_removed(run_package, tmp_path):
    """What SIGKILL leaves (a temp file, or the .old of a PNG folder being replaced) is cleared by the
    next run; an output a dead run was replacing is put back, never lost."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f".clip.mp4.vidrt-{dead.pid}.tmp").write_bytes(b"half a video")
    (tmp_path / f".frames.vidrt-{dead.pid}.old.tmp").mkdir()  # the old PNG folder, moved aside
    (tmp_path / f".frames.vidrt-{dead.pid}.old.tmp" / "frame_000000.png").write_bytes(b"png")
    alive = tmp_path / f".other.mp4.vidrt-{os.getpid()}.tmp"  # a live run's temp: left alone
    alive.write_bytes(b"in progress")
    done = subprocess.run(_args(run_package, tmp_path / "clip.mp4"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["clip.mp4", "frames", alive.name])
    assert (tmp_path / "frames" / "frame_000000.png").read_bytes() == b"png"

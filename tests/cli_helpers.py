"""Run `vidrt` in-process (vidrt.cli.main) or as a subprocess, and check its one-line errors."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vidrt.cli import main
from vidrt.package.manifest import MANIFEST_NAME, make_artifact

VIDRT = str(Path(sys.executable).with_name("vidrt"))  # the console script of this venv
SMALL = ["--steps", "1", "--size", "32x32", "--frames", "1", "-q"]  # a run of well under a second
USER_ERROR_CODES = {2, 3, 4, 5}
TEMP_RE = re.compile(r"^\..+\.vidrt-\d+(\.old)?\.tmp$")


def vidrt(capsys, *args: str) -> tuple[int, str]:
    """`vidrt ARGS` in this process -> (exit code, stderr). Restores the signal handlers main() sets."""
    old, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
    return code, capsys.readouterr().err


def assert_error(code: int, err: str, expected: int, *needles: str) -> str:
    """Exit code `expected`, exactly one non-empty stderr line starting `error: `, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, f"exit {code}, expected {expected}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def temps(folder: Path) -> list[str]:
    """vidrt's temporary files/folders in `folder` (`.<name>.vidrt-<pid>[.old].tmp`)."""
    return sorted(p.name for p in folder.iterdir() if TEMP_RE.match(p.name))


def copy_package(package: Path, dest: Path) -> Path:
    shutil.copytree(package, dest, ignore=shutil.ignore_patterns(".export.lock"))
    return dest


def rehash(package: Path, component: str) -> None:
    """Record a changed artifact's new sha256/size in manifest.json (as if the export had made it)."""
    path = package / MANIFEST_NAME
    raw = json.loads(path.read_text())
    entry = raw["tokenizer"] if component == "tokenizer" else raw["components"][component]["artifact"]
    art = make_artifact(package, entry["file"], entry.get("data_file"))
    entry.update(sha256=art.sha256, size_bytes=art.size_bytes)
    path.write_text(json.dumps(raw, indent=2))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs at tmp_path/ro for the block (read-only even for root, who writes into any chmod-ed
    folder); the test is skipped where mounting is not allowed (what ran before the block has run)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

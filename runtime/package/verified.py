"""Remembered sha256 checks, so that loading a 30 GB package does not re-read every byte each run.

A file hashed to its manifest digest once is recorded with its identity: device, inode, size,
mtime and ctime in ns. While all five are unchanged, the next load trusts the recorded digest.
Any write to the file changes its ctime, and user space cannot set ctime back, so an edited,
replaced or re-downloaded file is always hashed again (files changed in the last 2 s are not
remembered: timestamps come from a coarse clock). Only a raw write to the disk underneath
the file system would pass. `VIDRT_VERIFY=full` hashes everything regardless.

The record is `<cache>/verified.json`. `<cache>` is `$VIDRT_CACHE_DIR`, else
`$XDG_CACHE_HOME/vidrt`, else `~/.cache/vidrt`. It is a cache: unreadable or unwritable means
"hash again", never an error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

CACHE_ENV, VERIFY_ENV = "VIDRT_CACHE_DIR", "VIDRT_VERIFY"
MAX_ENTRIES = 4096  # oldest dropped first: ~40 packages of 100 files
# File timestamps come from a coarse clock (ms ticks): a file changed less than this long ago is
# hashed but not remembered, so an edit within the same tick cannot hide behind equal timestamps.
RACY_NS = 2_000_000_000


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vidrt"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    """{absolute path: [dev, ino, size, mtime_ns, ctime_ns, sha256]} kept between runs."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "verified.json"
        self.enabled = os.environ.get(VERIFY_ENV, "").lower() != "full"
        self.entries: dict[str, list[int | str]] = {}
        self.changed = False
        if self.enabled:
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self.entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 6}
            except (OSError, ValueError):
                pass

    def known(self, file: Path, digest: str) -> bool:
        """Was this very file (same identity) hashed to `digest` before?"""
        if not self.enabled:
            return False
        entry = self.entries.get(str(file.resolve()))
        try:
            return entry is not None and entry == [*_identity(file.stat()), digest]
        except OSError:
            return False

    def remember(self, file: Path, digest: str) -> None:
        st = file.stat()
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            return  # a write in the same clock tick would leave the timestamps as they are (git's "racy" case)
        key = str(file.resolve())
        self.entries.pop(key, None)  # re-insert: dicts keep insertion order, newest last
        self.entries[key] = [*_identity(st), digest]
        self.changed = True

    def save(self) -> None:
        if not (self.enabled and self.changed):
            return
        keep = dict(list(self.entries.items())[-MAX_ENTRIES:])
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(keep))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)

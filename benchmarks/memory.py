"""Peak memory of one run, in the process that runs it.

CPU: peak resident set size. Linux keeps it as VmHWM in /proc/self/status and resets it when "5"
is written to /proc/self/clear_refs, so each run's peak is exact (no sampling). Where that reset is
refused, a 10 ms sampling thread (psutil) takes over.
GPU: the process's device memory, sampled from nvidia-smi every 100 ms (TensorRT allocates outside
any allocator we could ask), and torch's own max_memory_reserved for the diffusers side.
"""

from __future__ import annotations

import os
import subprocess
import threading

_STATUS = "/proc/self/status"


def _status_kib(key: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """with PeakRSS() as p: ...;  p.peak_bytes = the highest RSS inside the block."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
            self.peak_bytes = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            kib = _status_kib("VmHWM")
            self.peak_bytes = (kib or 0) * 1024


class PeakGPU:
    """Peak device memory of this process (nvidia-smi, sampled); 0 when there is no nvidia-smi."""

    def __init__(self, interval: float = 0.1) -> None:
        self.peak_bytes = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self) -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        pid = str(os.getpid())
        rows = [[p.strip() for p in line.split(",")] for line in out.splitlines()]
        return sum(int(r[1]) * 2**20 for r in rows if len(r) == 2 and r[0] == pid and r[1].isdigit())

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._used())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakGPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._used())


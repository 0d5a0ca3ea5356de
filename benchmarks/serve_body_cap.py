"""Memory of `vidrt serve` when large bodies arrive: 200 MB POSTs without a token, with a wrong one,
and with the right one (over --max-body). The server must answer from the headers and not grow.

    python -m benchmarks.serve_body_cap [--port 8777] [--mb 200]

Starts `vidrt serve` (the bundled model, a token from VIDRT_SERVE_TOKEN, a temporary --out) and
prints each answer, how far the client got before the server closed, and the serve process's RSS
before and after (psutil). Ray's processes are not counted: they never see the HTTP body.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "a-token-of-20-chars!"


def main(argv: list[str] | None = None) -> int:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8777)
    ap.add_argument("--mb", type=int, default=200)
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="vidrt-bench-serve-"))
    vidrt = str(Path(sys.executable).with_name("vidrt"))
    proc = subprocess.Popen([vidrt, "serve", "--port", str(args.port), "--out", str(out / "videos")],
                            stderr=subprocess.DEVNULL, env={**os.environ, "VIDRT_SERVE_TOKEN": TOKEN})
    try:
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)
        serve = psutil.Process(proc.pid)
        before = serve.memory_info().rss
        body = b"x" * (args.mb << 20)
        for name, auth in (("no token", ""), ("wrong token", "Bearer wrong"), ("right token", f"Bearer {TOKEN}")):
            s = socket.create_connection(("127.0.0.1", args.port))
            head = (f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n" + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n")
            s.sendall(head.encode())
            sent, t0 = 0, time.monotonic()
            try:
                for i in range(0, len(body), 1 << 20):
                    s.sendall(body[i:i + (1 << 20)])
                    sent += 1 << 20
            except OSError:
                pass
            status = s.recv(200).split(b"\r\n")[0].decode()
            s.close()
            print(f"{args.mb} MB POST, {name:11s}: {status}; the client sent {sent >> 20} MB before the server "
                  f"closed ({time.monotonic() - t0:.2f} s)")
        time.sleep(1)
        after = serve.memory_info().rss
        print(f"vidrt serve RSS: {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after "
              f"({(after - before) / 2**20:+.1f} MiB)")
    finally:
        proc.send_signal(2)
        proc.wait(60)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

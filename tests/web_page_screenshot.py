"""Make docs/web-page.png: `vidrt serve`'s web page in Debian's headless Chromium (driven by Playwright, as
tests/test_serve.py drives it), in a desktop-wide window, serving the bundled model with two workers and a
LoRA folder: three clips finished (the `fast` recipe), two running, one queued, one finished clip playing in
the page, and the recipe and LoRA pickers (filled from GET /v1/models) set for the next clip.

    .venv/bin/python tests/web_page_screenshot.py docs/web-page.png      (or: make web-page-png)

A script, not a test: it only takes the picture (the page's behaviour is test_web_page_submits_a_job_and_
plays_the_clip). About a minute on 2 cores; the long jobs are cancelled before it ends.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import free_port  # noqa: E402
from test_serve import CHROMIUM, TOKEN, _fitting_lora, browser_page  # noqa: E402

HEADERS = {"authorization": f"Bearer {TOKEN}"}
FINISHED = [("a blue square moving up", 1), ("a green circle moving right", 2), ("a red circle moving left", 3)]
RUNNING = [("a yellow square moving down", 4), ("a red square moving right", 5)]
QUEUED = ("a blue circle moving up", 6)


def _create(url: str, body: dict[str, Any]) -> str:
    r = requests.post(f"{url}/v1/videos", json=body, headers=HEADERS, timeout=30)
    r.raise_for_status()
    return str(r.json()["id"])


def _wait(url: str, vid: str, until: Any, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = requests.get(f"{url}/v1/videos/{vid}", headers=HEADERS, timeout=30).json()
        if video["status"] == "failed":
            raise SystemExit(f"{vid} failed: {video['error']}")
        if until(video):
            return
        time.sleep(0.2)
    raise SystemExit(f"{vid}: not {what} after {timeout:.0f} s")


def main(out: str) -> None:
    from playwright.sync_api import sync_playwright
    from vidrt.models import default_package
    from vidrt.service.scaleout import connect_ray
    from vidrt.service.server import ServeConfig, Service

    package = default_package()
    if package is None or not Path(CHROMIUM).exists():
        raise SystemExit(f"needs the bundled model and {CHROMIUM} (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="vidrt-web-page-") as tmp:
        loras = Path(tmp) / "loras"
        loras.mkdir()
        _fitting_lora(loras / "style.safetensors", package)  # a name for the LoRA picker
        started = connect_ray(None, "serve", num_cpus=4)
        service = Service(ServeConfig(package=str(package), out_dir=str(Path(tmp) / "out"), workers=2, threads=1,
                                      token=TOKEN, max_steps=1000, lora_dir=str(loras)),
                          host="127.0.0.1", port=free_port())
        url = service.start_in_thread()
        try:
            finished = []
            for prompt, seed in FINISHED:  # one after the other: the newest is listed first
                finished.append(_create(url, {"prompt": prompt, "recipe": "fast", "seed": seed}))
                _wait(url, finished[-1], lambda v: v["status"] == "completed", "completed")
            running = [_create(url, {"prompt": p, "steps": 1000, "seed": s}) for p, s in RUNNING]
            _create(url, {"prompt": QUEUED[0], "steps": 1000, "seed": QUEUED[1]})
            for vid in running:
                _wait(url, vid, lambda v: v["status"] == "in_progress" and v["progress"] >= 5, "running")
            with sync_playwright() as p:
                browser, page = browser_page(p, viewport={"width": 1100, "height": 900}, device_scale_factor=1)
                try:
                    page.set_default_timeout(60_000)
                    page.goto(f"{url}/")
                    page.wait_for_selector("#token-box.on")
                    page.fill("#token", TOKEN)
                    page.click("#token-save")
                    page.wait_for_function("() => document.querySelectorAll('.job').length === 6")
                    page.fill("#prompt", "a green square moving left")
                    page.select_option("#recipe", "fast")
                    page.select_option("#loras", "style.safetensors")
                    page.locator(f".job[data-id='{finished[0]}'] button.play").click()
                    page.wait_for_function("() => { const v = document.getElementById('player'); return "
                                           "v.readyState >= 2 && v.currentTime > 0.5; }")
                    page.mouse.move(0, 0)
                    page.wait_for_timeout(4000)  # the player's own controls fade out while it plays (it loops)
                    page.screenshot(path=out, full_page=True)
                finally:
                    browser.close()
        finally:
            for video in requests.get(f"{url}/v1/videos", headers=HEADERS, timeout=30).json()["data"]:
                if video["status"] in ("queued", "in_progress"):
                    requests.delete(f"{url}/v1/videos/{video['id']}", headers=HEADERS, timeout=30)
            service.stop()
            if started:
                import ray

                ray.shutdown()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/web-page.png")

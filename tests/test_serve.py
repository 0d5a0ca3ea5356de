"""vidrt serve against the official OpenAI SDK (openai 3.57), its holes closed, its job table across a
restart, on a private local Ray with the bundled tiny model (64x64, 17 frames at 8 fps).

One server for the module (two workers, a token); the restart test runs its own servers on the same
Ray. Every wait is bounded and says what it waited for; every address is loopback.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
Image = pytest.importorskip("PIL.Image")

from cli_helpers import free_port  # noqa: E402
from vidrt.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

TOKEN = "test-token-0123456789abcdef"
QUICK = {"steps": 4, "seed": 1}
LONG = {"prompt": "a red circle moving left", "steps": 1000, "seed": 9}  # ~25 s: stopped long before it ends


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(run_package) -> Path:
    return Path(run_package)


@pytest.fixture(scope="module")
def local_ray():
    from vidrt.service.scaleout import connect_ray

    started = connect_ray(None, "serve", num_cpus=4)  # CPU slots are scheduling tokens here, not cores
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def served(package, local_ray, tmp_path_factory):
    from vidrt.service.server import ServeConfig, Service

    out = tmp_path_factory.mktemp("served")
    loras = tmp_path_factory.mktemp("loras")
    _lora_file(loras / "other-size.safetensors", rank_input=32)  # readable, but for a wider model than this
    config = ServeConfig(package=str(package), out_dir=str(out), workers=2, threads=1, token=TOKEN, max_queue=3,
                         max_steps=1000, max_body=64 * 1024, lora_dir=str(loras))
    service = Service(config, host="127.0.0.1", port=free_port())
    url = service.start_in_thread()
    yield url, out, service
    service.stop()


@pytest.fixture
def client(served):
    url, _, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def auth(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}", **(extra or {})}


def get(url: str) -> dict[str, Any]:
    r = requests.get(url, headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def start_long(client) -> str:
    video = client.videos.create(prompt=LONG["prompt"], extra_body={"steps": LONG["steps"], "seed": LONG["seed"]})
    wait_for(f"{video.id} to be denoising", lambda: (client.videos.retrieve(video.id).model_extra or {}).get("step"),
             120, 0.05)
    return video.id


def worker_of(url: str, vid: str) -> dict[str, Any] | None:
    return next((w for w in get(f"{url}/v1/workers")["data"] if w["job"] == vid), None)


# ---- the OpenAI SDK ----------------------------------------------------------------------------


def test_sdk_create_poll_retrieve_download(client, served):
    video = client.videos.create(prompt="a red circle moving left", seconds="2", size="64x64",
                                 model="tiny-shapes", extra_body=QUICK)  # the SDK sends multipart/form-data
    assert video.status in ("queued", "in_progress") and video.object == "video", video
    # `model` may name the package folder or the model; the Video names the model
    assert (video.prompt, video.seconds, video.size, video.model) == ("a red circle moving left", "2", "64x64",
                                                                      "vidrt-tiny-shapes")
    assert video.created_at <= time.time() + 1 and video.completed_at is None and video.expires_at is None
    polled = client.videos.create_and_poll(prompt="a blue square moving up", poll_interval_ms=100, extra_body=QUICK)
    assert polled.status == "completed" and polled.progress == 100 and polled.completed_at >= polled.created_at
    assert polled.seconds == "2.125" and polled.size == "64x64", polled  # the model's default: 17 frames at 8 fps
    done = wait_for(f"{video.id} to complete", lambda: (v := client.videos.retrieve(video.id)).status == "completed"
                    and v, 120)
    assert done.error is None and done.progress == 100

    frames = decode(client.videos.download_content(video.id).content)
    assert frames.shape == (17, 64, 64, 3)  # 2 s at 8 fps = 16 -> the 4k+1 count 17
    thumb = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    assert thumb.format == "JPEG" and thumb.size == (64, 64)
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert sheet.format == "JPEG" and sheet.size == (5 * 64, 2 * 64)  # 10 frames, 5 a row
    # the thumbnail is the clip's middle frame (JPEG-close), not some other picture
    middle = frames[len(frames) // 2].astype(np.float64)
    assert np.abs(np.asarray(thumb.convert("RGB"), np.float64) - middle).mean() < 8


def test_sdk_list_pages(client, served):
    url, _, _ = served
    made = [client.videos.create_and_poll(prompt=f"a green circle {i}", poll_interval_ms=100, extra_body=QUICK).id
            for i in range(5)]
    everything = [v.id for v in client.videos.list(limit=100)]
    assert len(everything) >= 5 and everything[:5] == made[::-1]  # newest first
    first = client.videos.list(limit=2)
    assert len(first.data) == 2 and first.has_more and first.last_id == first.data[-1].id
    assert first.model_extra.get("first_id") == first.data[0].id
    assert [v.id for v in client.videos.list(limit=2)] == everything  # the SDK follows `after` page by page
    assert [v.id for v in client.videos.list(limit=2, order="asc")] == everything[::-1]
    last = client.videos.list(limit=2, after=everything[-3])
    assert [v.id for v in last.data] == everything[-2:] and last.has_more is False
    with pytest.raises(openai.BadRequestError, match="after: no video"):
        client.videos.list(after="video_gone")
    # deleting while paging (the cursor itself is gone by the time the next page is asked for)
    page = client.videos.list(limit=2)
    seen = []
    while True:
        for v in page.data:
            seen.append(v.id)
            if v.id in made:
                client.videos.delete(v.id)
        if not page.has_next_page():
            break
        page = page.get_next_page()
    assert seen == everything
    assert not set(made) & {v.id for v in client.videos.list(limit=100)}


def test_sdk_delete_cancels_running_job(client, served):
    url, out, _ = served
    vid = start_long(client)
    worker = worker_of(url, vid)
    assert worker is not None
    gone = client.videos.delete(vid)
    assert (gone.id, gone.deleted, gone.object) == (vid, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(vid)
    with pytest.raises(openai.NotFoundError):  # a second delete: it is gone, like any unknown id
        client.videos.delete(vid)
    wait_for(f"worker {worker['index']} to let go of {vid}", lambda: worker_of(url, vid) is None, 60)
    assert not list(out.glob(f"*{vid}*")), "a deleted job left files"
    done = client.videos.delete(client.videos.create_and_poll(prompt="a cat", poll_interval_ms=100,
                                                              extra_body=QUICK).id)
    assert done.deleted and not list(out.glob(f"*{done.id}*"))


def test_cancel_keeps_the_record(client, served):
    url, out, _ = served
    vid = start_long(client)
    r = requests.post(f"{url}/v1/videos/{vid}/cancel", headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    v = client.videos.retrieve(vid)
    assert v.status == "failed" and v.error.code == "cancelled", v
    wait_for(f"{vid}'s worker to stop", lambda: worker_of(url, vid) is None, 60)
    with pytest.raises(openai.ConflictError, match="has no content"):  # not "exists once ... completed"
        client.videos.download_content(vid)
    assert not list(out.glob(f"{vid}.mp4"))
    client.videos.delete(vid)


def test_sdk_error_classes(client, served, tmp_path):
    url, _, _ = served
    with pytest.raises(openai.NotFoundError, match="no video 'video_nope'"):
        client.videos.retrieve("video_nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-token-0123456789", max_retries=0).videos.list()
    for kwargs, needle in (({"size": "720x1280"}, "vidrt-tiny-shapes here makes 64x64"),
                           ({"seconds": "12"}, "seconds 12 is 97 frames, over this server's limit of 17 frames"),
                           ({"model": "sora-2"}, "model 'sora-2' is not served here; this server runs "
                                                 "'vidrt-tiny-shapes'"),
                           ({"extra_body": {"frames": 10}}, "is not 4k+1"),
                           ({"extra_body": {"stepz": 3}}, "unknown field")):
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)) as err:
            client.videos.create(prompt="a cat", **kwargs)
        assert "\n" not in err.value.message
    image = tmp_path / "start.png"
    if served[2].state.api.spec.image is None:  # a text-only model refuses any image
        Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
        needle = "input_reference: vidrt-tiny-shapes makes video from text"
    else:  # the bundled tiny-shapes animates a picture: a file that is not one is refused
        image.write_bytes(b"GIF89a not really")
        needle = "input_reference is not an image"
    with pytest.raises(openai.BadRequestError, match=needle) as err:
        client.videos.create(prompt="a cat", input_reference=image)
    assert err.value.body["param"] == "input_reference"
    # a full queue: 429 (two workers busy, max_queue 3 waiting)
    ids: list[str] = []
    try:
        with pytest.raises(openai.RateLimitError, match="the queue is full"):
            for _ in range(8):
                ids.append(client.videos.create(prompt="a cat", extra_body={"steps": 1000}).id)
        assert len(ids) == 5, ids
        # ...answered from the headers: a body announced as 5000 bytes, 20 of them sent, is not waited for
        head = (f"POST /v1/videos HTTP/1.1\r\nHost: {url.split('//')[1]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 5000\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
        reply = raw_request(url, head, b'{"prompt": "a cat", ', wait=2.5)
        assert reply.startswith(b"HTTP/1.1 429"), reply[:300]
    finally:
        for vid in ids:
            client.videos.delete(vid)


def test_json_and_multipart_take_the_same_fields(served):
    url, _, _ = served
    fields = {"prompt": "a red circle", "seconds": "1", "size": "64x64", "steps": "3", "seed": "4",
              "negative_prompt": "blurry", "output_format": "webm"}
    as_json = {**fields, "steps": 3, "seed": 4}
    a = requests.post(f"{url}/v1/videos", json=as_json, headers=auth(), timeout=30)
    b = requests.post(f"{url}/v1/videos", files={k: (None, v) for k, v in fields.items()}, headers=auth(), timeout=30)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    va, vb = a.json(), b.json()
    assert {k: va[k] for k in ("seconds", "size", "frames", "output_format")} == \
           {k: vb[k] for k in ("seconds", "size", "frames", "output_format")} == \
           {"seconds": "1", "size": "64x64", "frames": 9, "output_format": "webm"}
    for bad in ({"steps": "many"}, {"seconds": "-1"}, {"prompt": ""}, {"bogus": "1"}, {"steps": "2000"}):
        ra = requests.post(f"{url}/v1/videos", json={**as_json, **bad}, headers=auth(), timeout=30)
        rb = requests.post(f"{url}/v1/videos", files={k: (None, v) for k, v in {**fields, **bad}.items()},
                           headers=auth(), timeout=30)
        assert ra.status_code == rb.status_code == 400, (bad, ra.text, rb.text)
        assert ra.json()["error"]["param"] == rb.json()["error"]["param"], (ra.text, rb.text)
    for r in (a, b):
        requests.delete(f"{url}/v1/videos/{r.json()['id']}", headers=auth(), timeout=30)


def test_loras_travel_as_the_sdk_and_forms_send_them(client, served):
    """The openai SDK sends create as multipart with a list as repeated `loras[]`; curl -F repeats `loras`;
    JSON sends a list. All three reach the LoRA check (names this server's --lora-dir lacks: that refusal)."""
    url, _, _ = served
    with pytest.raises(openai.BadRequestError, match="'style.safetensors' is not in this server's LoRA folder; "
                                                     "it has other-size.safetensors") as err:
        client.videos.create(prompt="a cat", extra_body={"loras": ["style.safetensors:0.8", "b.safetensors"]})
    assert err.value.body["param"] == "loras"
    for sent in ({"files": [("prompt", (None, "a cat")), ("loras", (None, "style.safetensors"))]},
                 {"files": [("prompt", (None, "a cat")), ("loras", (None, "a.safetensors")),
                            ("loras", (None, "b.safetensors:0.5"))]},
                 {"json": {"prompt": "a cat", "loras": ["style.safetensors"]}}):
        r = requests.post(f"{url}/v1/videos", headers=auth(), timeout=30, **sent)
        assert r.status_code == 400 and "not in this server's LoRA folder" in r.json()["error"]["message"], \
            (sent, r.text)
    for bad in ({"seed": True}, {"steps": False}, {"guidance": True}):  # errors.md 11b: no booleans for numbers
        r = requests.post(f"{url}/v1/videos", json={"prompt": "a cat", **bad}, headers=auth(), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text
        assert "not true/false" in r.json()["error"]["message"]


def test_lora_fit_recipe_and_fields_are_checked_at_create(client, served):
    """Before anything is queued: a LoRA that does not fit the DiT (checked from its header against the
    model's keys and shapes), a name that is not a .safetensors file of --lora-dir, a recipe made for the
    client's own LoRA sent without one, strict JSON numbers, unknown repeated form fields. Every refusal
    names the API's fields (no `vidrt run` flag, no server path); /v1/models lists recipes and LoRAs."""
    url, _, service = served
    lora_dir = service.state.api.lora_dir
    (lora_dir / "readme.txt").write_text("not a LoRA")
    before = len(client.videos.list().data)
    for body, param, needle in (
            ({"loras": ["other-size.safetensors:0.5"]}, "loras",
             "loras: 'other-size.safetensors' does not fit this model: "),
            ({"loras": ["readme.txt"]}, "loras", "loras: 'readme.txt' is not in this server's LoRA folder; it has "
                                                 "other-size.safetensors"),
            ({"recipe": "lightx2v-4step"}, "recipe", "recipe lightx2v-4step is made for a distillation LoRA"),
            ({"guidance": 1, "cache": "teacache"}, "cache", "; leave cache out")):
        with pytest.raises(openai.BadRequestError) as err:
            client.videos.create(prompt="a cat", extra_body={**body, **QUICK})
        message = err.value.body["message"]
        assert err.value.body["param"] == param and needle in message, err.value.body
        assert str(lora_dir) not in message and "--" not in message and "\n" not in message, message
    assert len(client.videos.list().data) == before  # nothing was queued
    for sent, param, needle in (({"json": {"prompt": "a cat", "steps": "4"}}, "steps", 'steps: must be an integer, '
                                                                                        'got "4"'),
                                ({"json": {"prompt": "a cat", "frames": 81}}, "frames", "frames 81 is over this "
                                                                                        "server's limit of 17"),
                                ({"json": {"prompt": "a cat", "frames": 18}}, "frames", "frames 18 is not 4k+1; "
                                                                                        "use 17; "),
                                ({"json": {"prompt": "a cat", "crf": 0}}, "crf", "crf 0 is lossless H.264"),
                                ({"json": {"prompt": "a cat", "size": "64 x 64"}}, "size",
                                 'size: "64 x 64" is not WIDTHxHEIGHT; write it like 832x480'),
                                ({"json": {"prompt": "a cat", "size": "6400x64"}}, "size", "(size WxH)"),
                                ({"data": '{"prompt": "a cat", "guidance": NaN}'}, "guidance",
                                 "guidance: must be a finite number"),
                                ({"files": [("prompt", (None, "a cat")), ("timesteps[]", (None, "1000")),
                                            ("timesteps[]", (None, "500"))]}, "timesteps[]", "unknown field")):
        r = requests.post(f"{url}/v1/videos", headers=auth({"content-type": "application/json"} if "data" in sent
                                                             else None), timeout=30, **sent)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and needle in error["message"], (sent, r.text)
        assert "--" not in error["message"], error
        if param == "crf":
            assert "pixels" not in error["message"], error  # no size note on a CRF refusal
    model = client.models.list().data[0]  # the SDK parses the extra fields
    caps = model.model_extra["capabilities"]
    assert caps["loras"] == ["other-size.safetensors"], caps["loras"]
    by_name = {r["name"]: r for r in caps["recipes"]}
    assert {k: by_name["lightx2v-4step"][k] for k in ("steps", "guidance", "needs_lora", "scheduler")} == \
        {"steps": 4, "guidance": 1.0, "needs_lora": True, "scheduler": "euler"}, by_name


def test_client_gone_mid_body_is_one_log_line(served, caplog):
    url, _, _ = served
    host, port = url.split("//")[1].split(":")
    head = (f"POST /v1/videos HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 5000\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
    uvicorn_log = logging.getLogger("uvicorn.error")  # where an unhandled ASGI exception goes (not propagated)
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(head.encode() + b'{"prompt": "a ')
                time.sleep(0.3)
            wait_for("the disconnect to be logged", lambda: any("went away" in r.getMessage()
                                                                for r in caplog.records), 10)
            time.sleep(0.3)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()], caplog.text
    assert get(f"{url}/health")["status"] == "ok"


def test_start_checks_before_ray(package, served, tmp_path):
    """--max-size off the model's grid, --out a file, --out held by another serve: refused by check_config,
    which the CLI runs before Ray starts."""
    from vidrt.service.server import ServeConfig, check_config

    with pytest.raises(UsageError, match=r"--max-size 63x64: .* multiples of 16 pixels; use --max-size 48x64"):
        check_config(ServeConfig(package=str(package), out_dir=str(tmp_path / "a"), max_size=(63, 64)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file; give a folder"):
        check_config(ServeConfig(package=str(package), out_dir=str(tmp_path / "file")))
    with pytest.raises(UsageError, match="in use by another vidrt serve"):
        check_config(ServeConfig(package=str(package), out_dir=str(served[1])))
    limits = check_config(ServeConfig(package=str(package), out_dir=str(tmp_path / "b"), max_size=(32, 48)))
    assert (limits.max_pixels, limits.max_size, limits.max_frames) == (32 * 48, (32, 48), 17)
    # --max-steps under the model's default (25) would refuse every request without steps: refused at start
    with pytest.raises(UsageError, match=r"^--max-steps 3 is under vidrt-tiny-shapes's default of 25 steps, .*use "
                                         r"--max-steps 25 or more"):
        check_config(ServeConfig(package=str(package), out_dir=str(tmp_path / "c"), max_steps=3))
    assert check_config(ServeConfig(package=str(package), out_dir=str(tmp_path / "c"), max_steps=25)).max_steps == 25


# ---- holes -------------------------------------------------------------------------------------


def raw_request(url: str, head: str, body: bytes = b"", wait: float = 10.0) -> bytes:
    """Send `head` (+ `body`) on a fresh connection; return what the server answers within `wait` s."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head.encode() + body)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_body_over_the_cap_is_refused_unread(served):
    url, _, _ = served
    hostport = url.split("//")[1]
    big = 200 * 2**20
    for token, status in ((TOKEN, b"413"), (None, b"401")):  # the token is checked before the size
        head = (f"POST /v1/videos HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {big}\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
        t0 = time.monotonic()
        reply = raw_request(url, head)  # the 200 MB are never sent: an answer proves they were not read
        assert reply.split(b"\r\n")[0].split(b" ")[1] == status, reply[:300]
        assert time.monotonic() - t0 < 10
    # no Content-Length (chunked): counted as it arrives, cut off past the cap
    head = (f"POST /v1/videos HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
    chunk = b"x" * 32768
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(3))  # 96 KB > 64 KB cap
    reply = raw_request(url, head, body)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"--max-body 65536" in reply
    assert get(f"{url}/health")["status"] == "ok"


def test_foreign_host_refused_and_no_cors(served):
    url, _, _ = served
    port = url.rsplit(":", 1)[1]
    r = requests.get(f"{url}/health", headers={"host": f"evil.example:{port}"}, timeout=30)
    assert r.status_code == 400 and "--allow-host evil.example" in r.json()["error"]["message"], r.text
    r = requests.get(f"{url}/", headers={"host": "rebound.example"}, timeout=30)
    assert r.status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert requests.get(f"{url}/health", headers={"host": host}, timeout=30).status_code == 200
    r = requests.get(f"{url}/v1/videos", headers=auth({"origin": "http://evil.example"}), timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = requests.options(f"{url}/v1/videos", headers={"origin": "http://evil.example",
                                                        "access-control-request-method": "POST"}, timeout=30)
    assert "access-control-allow-origin" not in pre.headers


def test_bind_and_token_rules(tmp_path):
    from vidrt.cli.fleet import parse_bytes, parse_duration, read_token
    from vidrt.service.server import allowed_hosts_for, check_bind

    check_bind("127.0.0.1", None)
    with pytest.raises(UsageError, match="give --token-file"):
        check_bind("0.0.0.0", None)
    with pytest.raises(UsageError, match="the token is 8 characters; --host 192.0.2.1 needs at least 16"):
        check_bind("192.0.2.1", "short-12")
    check_bind("0.0.0.0", "x" * 16)
    tf = tmp_path / "token"
    tf.write_text("  secret-secret-secret-1\n")
    assert read_token(None, str(tf)) == "secret-secret-secret-1"
    with pytest.raises(UsageError, match="not both"):
        read_token("a", str(tf))
    with pytest.raises(UsageError, match="cannot be read"):
        read_token(None, str(tmp_path / "missing"))
    assert (parse_duration("7d", "--keep"), parse_duration("forever", "--keep"), parse_duration("90s", "-k")) == \
           (7 * 86400, None, 90)
    assert parse_bytes("4MB", "--max-body") == 4 << 20 and parse_bytes("512kb", "--max-body") == 512 << 10
    with pytest.raises(UsageError, match="--keep '7 weeks' is not a duration"):
        parse_duration("7 weeks", "--keep")
    assert allowed_hosts_for("127.0.0.1", ("*",)) is None
    assert {"localhost", "127.0.0.1", "::1", "gpu-box.lan"} <= allowed_hosts_for("127.0.0.1", ("gpu-box.lan",))
    assert socket.gethostname().lower() in allowed_hosts_for("0.0.0.0", ())  # a wildcard bind: this machine's names


def test_killed_worker_scratch_is_removed(served):
    url, _, _ = served
    import tempfile

    workers = get(f"{url}/v1/workers")["data"]
    victim = workers[0]
    scratch = list(Path(tempfile.gettempdir()).glob(f"vidrt-worker-{victim['pid']}-*"))
    assert len(scratch) == 1 and scratch[0].is_dir(), scratch
    os.kill(victim["pid"], signal.SIGKILL)
    def restarted() -> bool:
        now = next(w for w in get(f"{url}/v1/workers")["data"] if w["index"] == victim["index"])
        return now["pid"] not in (None, victim["pid"])

    wait_for("the killed worker to restart", restarted, 120)
    assert not scratch[0].exists(), "the killed worker's scratch folder was left behind"


def test_private_ray_listens_on_loopback_only(tmp_path):
    """A private Ray (no --ray) binds every port, metrics and dashboard agent included, to loopback."""
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "ports.py"
    script.write_text(
        "import json, psutil\n"
        "from vidrt.service.scaleout import connect_ray\n"
        "connect_ray(None, 'serve', num_cpus=1)  # imports ray itself, first\n"
        "import ray\n"
        "import time; time.sleep(3)\n"
        "kids = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}\n"
        "ports = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections('inet') if c.status == 'LISTEN'"
        " and c.pid in kids]\n"
        "print(json.dumps(ports)); ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    ports = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(ports) >= 5, ports  # GCS, raylet, object manager, dashboard agent, metrics...
    public = [p for p in ports if not (p[0].startswith("127.") or p[0] in ("::1", "::ffff:127.0.0.1"))]
    assert not public, f"Ray listens beyond loopback: {public}"
    del psutil


# ---- the job table across restarts -------------------------------------------------------------


def test_restart_keeps_finished_and_runs_queued(package, local_ray, tmp_path):
    from vidrt.service.server import ServeConfig, Service
    from vidrt.service.store import DB_FILES

    out = tmp_path / "out"
    loras = tmp_path / "loras"
    loras.mkdir()
    _fitting_lora(loras / "gone.safetensors", package)
    _fitting_lora(loras / "swapped.safetensors", package)
    config = ServeConfig(package=str(package), out_dir=str(out), workers=1, threads=1, max_steps=1000,
                         lora_dir=str(loras))
    first_server = Service(config, port=free_port())
    client = openai.OpenAI(base_url=f"{first_server.start_in_thread()}/v1", api_key="-", max_retries=0)
    done = client.videos.create_and_poll(prompt="a red circle moving left", poll_interval_ms=100, extra_body=QUICK)
    clip = client.videos.download_content(done.id).content
    running = client.videos.create(prompt="a blue square moving up", extra_body={"steps": 300, "seed": 2})
    wait_for(f"{running.id} to run", lambda: client.videos.retrieve(running.id).status == "in_progress", 60, 0.05)
    queued = [client.videos.create(prompt=f"a green circle {i}", extra_body=QUICK).id for i in range(2)]
    # queued with LoRAs that fit; before the restart one file is removed, the other replaced by one that does not fit
    lora_jobs = [client.videos.create(prompt="a cat", extra_body={**QUICK, "loras": [f"{name}.safetensors:0.5"]}).id
                 for name in ("gone", "swapped")]
    with pytest.raises(UsageError, match="is in use by another vidrt serve"):
        Service(config, port=free_port())  # one writer: the job table is locked
    pids = [w["pid"] for w in first_server.state.manager.workers()]
    first_server.stop()  # mid-queue: one running, two waiting
    import tempfile

    left = [p for pid in pids for p in Path(tempfile.gettempdir()).glob(f"vidrt-worker-{pid}-*")]
    assert pids and not left, f"scratch folders left by stopped workers: {left}"

    (loras / "gone.safetensors").unlink()
    _lora_file(loras / "swapped.safetensors", rank_input=32)
    (out / "video_orphan.mp4").write_bytes(b"left by a job deleted while a server stopped")
    (out / f".{queued[0]}.mp4.vidrt-999999999.tmp").write_bytes(b"half a clip of a dead process")
    origin = "http://app.example"
    second_server = Service(replace(config, cors_origins=(origin,)), port=free_port())
    assert second_server.restored == {"completed": 1, "queued": 4, "requeued": 1, "failed": 0, "orphans": 1}
    client = openai.OpenAI(base_url=f"{second_server.start_in_thread()}/v1", api_key="-", max_retries=0)
    try:
        assert client.videos.download_content(done.id).content == clip  # finished: still served
        for vid in (running.id, *queued):
            v = wait_for(f"{vid} to complete after the restart",
                         lambda vid=vid: (v := client.videos.retrieve(vid)).status not in ("queued", "in_progress")
                         and v, 120)
            assert v.status == "completed", v
            assert decode(client.videos.download_content(vid).content).shape == (17, 64, 64, 3)
        for vid, code, needle in zip(lora_jobs, ("lora_not_found", "invalid_request"),
                                     ("loras: 'gone.safetensors' is no longer in this server's LoRA folder",
                                      "loras: 'swapped.safetensors' does not fit this model"), strict=True):
            v = wait_for(f"{vid} to fail", lambda vid=vid: (v := client.videos.retrieve(vid)).status == "failed" and v)
            assert v.error.code == code and v.error.message.startswith(needle), v.error  # API codes, no class names
            assert "give the path" not in v.error.message and str(loras) not in v.error.message, v.error
        assert [v.id for v in client.videos.list()] == [*lora_jobs[::-1], *queued[::-1], running.id, done.id]
        # CORS when asked (--cors-origin): that origin only
        url = str(client.base_url).rstrip("/")
        pre = requests.options(f"{url}/videos", headers={"origin": origin, "access-control-request-method": "POST",
                                                         "access-control-request-headers": "authorization"},
                               timeout=30)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin, pre.headers
        assert requests.get(f"{url}/videos", headers={"origin": origin}, timeout=30).headers[
            "access-control-allow-origin"] == origin
        other = requests.get(f"{url}/videos", headers={"origin": "http://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in other.headers
    finally:
        second_server.stop()
    ids = [done.id, running.id, *queued]
    owned = {f"{i}{ext}" for i in ids for ext in (".mp4", ".json", ".thumbnail.jpg", ".spritesheet.jpg")}
    left = {p.name for p in out.iterdir()} - set(DB_FILES)
    assert left == owned, f"orphans {left - owned}, missing {owned - left}"

    # --keep: a restart with a keep shorter than the clips' age removes them and their rows
    time.sleep(1.0)
    third = Service(ServeConfig(package=str(package), out_dir=str(out), workers=1, threads=1, keep_seconds=0.5),
                    port=free_port())
    try:
        assert third.state.manager.jobs == {} and {p.name for p in out.iterdir()} <= set(DB_FILES)
    finally:
        third.state.store.close()


# ---- the web page, in a real browser -----------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's package (the Makefile installs it); Playwright's own download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_page(playwright: Any, **context: Any) -> Any:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    return browser, browser.new_context(**context).new_page()


def test_web_page_submits_a_job_and_plays_the_clip(served, tmp_path):
    """Headless Chromium on a phone-sized screen: the page asks for the token, a prompt is submitted,
    progress shows, the finished clip plays in the page (decoded frames, not just a URL), and it is
    deleted from the page."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; `make test` does it as root)")
    url, out, _ = served
    shot = os.environ.get("VIDRT_SCREENSHOT")  # a phone-sized picture (docs/web-page.png: web_page_screenshot.py)
    with sync_api.sync_playwright() as p:
        browser, page = browser_page(p, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                     is_mobile=True, has_touch=True)
        try:
            page.set_default_timeout(60_000)
            page.goto(f"{url}/")
            page.wait_for_selector("#token-box.on")  # the server has a token: the page asks for it
            page.fill("#token", TOKEN)
            page.click("#token-save")
            page.wait_for_function("() => document.getElementById('model').textContent === 'vidrt-tiny-shapes'")
            assert page.locator("#size option").all_inner_texts() == ["64 × 64"]
            assert "2.13 s · 17 frames" in page.locator("#frames option").all_inner_texts()
            # /v1/models' recipes and --lora-dir's LoRA names fill the pickers
            recipes = page.locator("#recipe option").all_inner_texts()
            assert "lightx2v-4step · 4 steps · needs your LoRA" in recipes, recipes
            assert page.locator("#loras option").all_inner_texts() == ["other-size.safetensors"]
            page.fill("#prompt", "a red circle moving left")
            fast = "fast · 4 steps" in recipes  # the bundled model's own recipe (its LoRA ships with it)
            if fast:
                page.select_option("#recipe", "fast")
            page.click("summary")
            if not fast:
                page.fill("#steps", "6")
            page.fill("#seed", "3")
            page.click("#submit")
            page.wait_for_selector("#message:has-text('queued video_')")
            vid = page.locator("#message").inner_text().split()[-1]
            card = page.locator(f".job[data-id='{vid}']")
            card.locator("button.play").wait_for()  # completed: the page polled it to the end
            card.locator("img").wait_for()
            assert page.evaluate(f"() => document.querySelector(\".job[data-id='{vid}'] img\").naturalWidth") == 64
            card.locator("button.play").click()
            page.wait_for_function("() => { const v = document.getElementById('player'); return v.readyState >= 2 "
                                   "&& v.videoWidth === 64 && v.duration > 2 && v.currentTime > 0; }")
            if shot:
                page.screenshot(path=shot, full_page=True)
            served_frames = decode(requests.get(f"{url}/v1/videos/{vid}/content", headers=auth(), timeout=30).content)
            assert served_frames.shape == (17, 64, 64, 3)
            settings = json.loads((out / f"{vid}.json").read_text())["settings"]  # the clip's stats JSON
            assert (settings["recipe"], settings["steps"], settings["scheduler"]) == \
                (("fast", 4, "euler") if fast else (None, 6, "unipc")), settings
            card.locator("button.delete").click()
            card.wait_for(state="detached")
            assert requests.get(f"{url}/v1/videos/{vid}", headers=auth(), timeout=30).status_code == 404
            assert not list(out.glob(f"{vid}*"))
        finally:
            browser.close()


def test_restore_rules_without_ray(package, tmp_path):
    """The job table's restart rules, job by job (no workers needed): interrupted once -> queued again,
    twice -> failed; a clip whose file went -> failed; cancelled mid-run -> finished as cancelled;
    --keep applied to what finished before; rows survive the store being closed and opened."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.jobs import JobRequest
    from vidrt.service.scaleout import JobManager
    from vidrt.service.store import DB_NAME, JobStore

    spec = load_manifest(package, verify=False).model
    out = tmp_path / "out"
    out.mkdir()
    store = JobStore(out / DB_NAME)
    manager = JobManager(package, out, store=store)
    request = JobRequest(prompt="a red circle", seed=1)
    jobs = [manager.submit(request, request.settings(spec)) for _ in range(5)]
    running_once, running_twice, gone, cancelled, finished = jobs
    for job in (running_once, running_twice, cancelled):
        job.status = "in_progress"
    running_twice.restarts = 1
    cancelled.status, cancelled.cancel_requested = "cancelled", True
    for job in (gone, finished):
        manager._finish(job, "completed")
    finished.output.write_bytes(b"a clip")
    for job in jobs:
        manager._save(job)
    store.close()

    again = JobManager(package, out, store=JobStore(out / DB_NAME), keep_seconds=3600)
    report = again.restore()
    assert report == {"completed": 1, "queued": 0, "requeued": 1, "failed": 2, "orphans": 0}, report
    got = {j.id: j for j in again.jobs.values()}
    assert (got[running_once.id].status, got[running_once.id].restarts) == ("queued", 1)
    assert (got[running_twice.id].status, got[running_twice.id].error_code) == ("failed", "interrupted")
    assert (got[gone.id].status, got[gone.id].error_code) == ("failed", "file_missing")
    assert got[cancelled.id].status == "cancelled" and got[cancelled.id].completed_at is not None
    assert got[finished.id].expires_at == pytest.approx(got[finished.id].completed_at + 3600)
    assert [j.id for j in again._pending] == [running_once.id]
    assert again.expire(now=time.time() + 7200) == 4  # everything finished is past its keep
    assert list(again.jobs) == [running_once.id] and not finished.output.exists()
    again.store.close()


def test_a_queued_job_whose_kept_image_is_gone_fails_input_lost(package, tmp_path, monkeypatch):
    """A queued job's start image removed from --out/inputs/ (while the server was stopped, or while it
    waited) fails it with input_lost (the server's doing, not invalid_request) and a message with no server
    path that says to send the image again: at restore, and when a worker would take it. No workers needed."""
    import asyncio

    from vidrt.package.manifest import load_manifest
    from vidrt.service.jobs import JobRequest
    from vidrt.service.scaleout import JobManager
    from vidrt.service.store import DB_NAME, JobStore

    spec = load_manifest(package, verify=False).model
    out = tmp_path / "out"
    inputs = out / "inputs"
    inputs.mkdir(parents=True)
    kept = [inputs / "input-0a79", inputs / "input-1b80"]
    for path in kept:
        path.write_bytes(_png())
    manager = JobManager(package, out, store=JobStore(out / DB_NAME), inputs_dir=inputs)
    requests = [JobRequest(prompt="a red circle", image=str(path)) for path in kept]
    stopped, waiting = (manager.submit(r, r.settings(spec)) for r in requests)
    manager.store.close()
    kept[0].unlink()  # removed while the server was stopped

    again = JobManager(package, out, store=JobStore(out / DB_NAME), inputs_dir=inputs)
    report = again.restore()
    assert (report["failed"], report["queued"]) == (1, 1), report
    kept[1].unlink()  # removed while the job waited for a worker

    async def take() -> Any:
        again._wake = asyncio.Event()
        return await again._take()

    monkeypatch.setattr("vidrt.service.scaleout.IDLE_CHECK_SECONDS", 0.01)
    assert asyncio.run(take()) is None  # nothing left to run
    for job_id in (stopped.id, waiting.id):
        job = again.jobs[job_id]
        assert (job.status, job.error_code) == ("failed", "input_lost"), (job.status, job.error_code)
        assert str(tmp_path) not in job.error and "sending the image again" in job.error, job.error
    again.store.close()


def test_restored_jobs_keep_to_this_starts_lora_dir(package, tmp_path):
    """A queued (or interrupted) job restored by a server restarted with another --lora-dir, or none, is
    failed with lora_not_found naming the bare file name (never the old server path), even when the old
    file still exists: a server only reads the LoRA folder its operator gives it now. No workers needed."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.jobs import JobRequest
    from vidrt.service.scaleout import JobManager
    from vidrt.service.store import DB_NAME, JobStore

    spec = load_manifest(package, verify=False).model
    old, new = tmp_path / "old", tmp_path / "new"
    for folder in (old, new):
        folder.mkdir()
        _fitting_lora(folder / "kept.safetensors", package)
    for lora_dir, needle in ((new, "is not in this server's LoRA folder"), (None, "takes no LoRAs now")):
        out = tmp_path / f"out-{lora_dir is None}"
        out.mkdir()
        manager = JobManager(package, out, store=JobStore(out / DB_NAME), lora_dir=str(old))
        jobs = [manager.submit(r, r.settings(spec)) for r in (
            JobRequest(prompt="a red circle", seed=1, loras=(f"{old / 'kept.safetensors'}:0.5",)),
            JobRequest(prompt="a red circle", seed=1, loras=(f"{new / 'kept.safetensors'}",)),
            JobRequest(prompt="a red circle", seed=1))]
        jobs[1].status = "in_progress"
        for job in jobs:
            manager._save(job)
        manager.store.close()
        again = JobManager(package, out, store=JobStore(out / DB_NAME),
                           lora_dir=None if lora_dir is None else str(lora_dir))
        report = again.restore()
        got = [again.jobs[j.id] for j in jobs]
        assert (got[0].status, got[0].error_code) == ("failed", "lora_not_found"), got[0]
        assert got[0].error.startswith("loras: 'kept.safetensors'") and needle in got[0].error, got[0].error
        assert str(tmp_path) not in got[0].error and "--" not in got[0].error, got[0].error
        if lora_dir is None:  # the interrupted job's LoRA is gone with the folder too
            assert (got[1].status, got[1].error_code) == ("failed", "lora_not_found"), got[1]
            assert report == {"completed": 0, "queued": 1, "requeued": 0, "failed": 2, "orphans": 0}, report
        else:  # its file is in the folder this start serves: it runs again
            assert got[1].status == "queued", got[1]
            assert report == {"completed": 0, "queued": 1, "requeued": 1, "failed": 1, "orphans": 0}, report
        assert got[2].status == "queued" and [j.id for j in again._pending] == [j.id for j in got if
                                                                             j.status == "queued"]
        again.store.close()


def _fitting_lora(path: Path, package: Path) -> Path:
    """A LoRA for block 0's self-attention q that fits this package's DiT (its recorded weight shape)."""
    from vidrt.package.manifest import load_manifest

    width = load_manifest(package, verify=False).components["dit"].weights["blocks.0.attn1.to_q.weight"].shape[0]
    return _lora_file(path, rank_input=width, rank_output=width)


def _lora_file(path: Path, value: float = 1.0, rank_input: int = 64, rank_output: int = 64) -> Path:
    """A tiny LoRA for block 0's self-attention q (value: every lora_down entry; NaN makes a damaged file;
    rank_input: lora_down's input width; these files are only read at create time, except other-size.safetensors:
    32 wide, narrower than the bundled DiT (`vidrt info`), so the worker's merge refuses it)."""
    from safetensors.numpy import save_file

    q = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{q}.lora_down.weight": np.full((4, rank_input), value, np.float32),
               f"{q}.lora_up.weight": np.ones((rank_output, 4), np.float32)}, str(path))
    return path


def test_loras_only_by_name_from_the_operators_folder(tmp_path):
    """A client may not make the server open a file of its choosing: LoRAs are bare names inside the
    operator's --lora-dir, and without one the server takes none."""
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI

    spec = load_manifest(default_package(), verify=False).model
    limits = ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50)
    (tmp_path / "loras").mkdir()
    _lora_file(tmp_path / "loras" / "style.safetensors")
    _lora_file(tmp_path / "loras" / "nan.safetensors", float("nan"))
    (tmp_path / "loras" / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "secret.safetensors").write_bytes(b"x")

    def refusal(api: VideoAPI, loras: list[str]) -> ApiError:
        with pytest.raises(ApiError) as info:
            api.to_job({"prompt": "a red circle moving left", "loras": loras})
        assert info.value.status == 400 and info.value.param == "loras"
        return info.value

    closed = VideoAPI(spec, limits)
    closed_msg = refusal(closed, ["style.safetensors"]).message  # the operator's fix, in words (no server flag)
    assert "operator" in closed_msg and "--" not in closed_msg, closed_msg
    with pytest.raises(ApiError) as info:  # a recipe made for the client's own LoRA: no advice to send one
        closed.to_job({"prompt": "a red circle moving left", "recipe": "lightx2v-4step"})
    assert (info.value.status, info.value.param) == (400, "recipe"), info.value
    assert "takes no LoRAs" in info.value.message and "add it to loras" not in info.value.message, info.value.message
    api = VideoAPI(spec, limits, lora_dir=str(tmp_path / "loras"))
    for bad in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "..", ".hidden"):
        assert "not a path" in refusal(api, [bad]).message
    assert "style.safetensors" in refusal(api, ["missing.safetensors"]).message  # names what there is
    # a damaged file is read at create time and named as the client named it: no server path, no CLI flag
    for bad, needle in (("nan.safetensors:0.5", "holds NaN or Inf"), ("junk.safetensors", "not a safetensors")):
        message = refusal(api, [bad]).message
        assert message.startswith("loras: 'nan.safetensors'" if "nan" in bad else "loras: 'junk.safetensors'")
        assert needle in message and str(tmp_path) not in message and "--lora" not in message, message
    job, _, _ = api.to_job({"prompt": "a red circle moving left", "loras": ["style.safetensors:0.5"]})
    assert [(Path(r.path), r.strength) for r in job.to_request().loras] == \
        [((tmp_path / "loras" / "style.safetensors").resolve(), 0.5)]


def test_a_lora_twice_is_refused_at_create_and_nothing_is_read_before_the_limits(package, tmp_path, monkeypatch):
    """The same file twice, or two byte-identical files, is refused at create (as the worker's merge would
    refuse it), named as the client named them; the recipe's own LoRA sent again is not a twin. A request over
    a limit is refused before any LoRA file is opened (a server never reads what it will refuse)."""
    import shutil

    import vidrt.service.api as api_module
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI

    spec = load_manifest(package, verify=False).model
    folder = tmp_path / "loras"
    folder.mkdir()
    _fitting_lora(folder / "a.safetensors", package)
    shutil.copy(folder / "a.safetensors", folder / "b.safetensors")
    api = VideoAPI(spec, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), str(package), None,
                   lora_dir=str(folder))
    for loras, first, second in ((["a.safetensors:0.5", "a.safetensors:0.3"], "a", "a"),
                                 (["a.safetensors:0.5", "b.safetensors"], "b", "a")):
        with pytest.raises(ApiError) as info:
            api.to_job({"prompt": "a red circle", "loras": loras})
        message = info.value.message
        assert (info.value.status, info.value.param) == (400, "loras"), info.value
        assert message.startswith(f"loras: '{first}.safetensors' is the same file as loras: '{second}.safetensors'")
        assert str(tmp_path) not in message and "--" not in message, message
    api.to_job({"prompt": "a red circle", "loras": ["a.safetensors:0.5"]})  # once is fine
    opened: list[str] = []
    monkeypatch.setattr(api_module, "read_lora", lambda path, *a, **k: opened.append(str(path)))
    api._lora_checked.clear()
    for over in ({"steps": 51}, {"size": "128x128"}, {"frames": 21}):
        with pytest.raises(ApiError) as info:
            api.to_job({"prompt": "a red circle", "loras": ["b.safetensors:0.5"], **over})
        assert info.value.param in ("steps", "size", "frames"), info.value
    assert opened == [], opened


def test_a_per_expert_lora_on_a_one_denoiser_model_is_refused_in_the_clients_words(package, tmp_path):
    """`dit_high=NAME` on a one-denoiser model is refused at create with the API's field and the client's
    LoRA name: no `--lora` flag, no path of the server's LoRA folder."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI

    spec = load_manifest(package, verify=False).model
    folder = tmp_path / "loras"
    folder.mkdir()
    _fitting_lora(folder / "a.safetensors", package)
    api = VideoAPI(spec, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), str(package), None,
                   lora_dir=str(folder))
    with pytest.raises(ApiError) as info:
        api.to_job({"prompt": "a red circle", "loras": ["dit_high=a.safetensors"]})
    message = info.value.message
    assert (info.value.status, info.value.param) == (400, "loras"), info.value
    assert message == "loras: 'a.safetensors' is for expert dit_high, this model has dit; a LoRA on a one-denoiser " \
        "model is for every expert: name it in loras without \"dit_high=\"", message


def test_a_recipe_whose_lora_is_baked_in_is_taken_at_create_and_run(baked_package, package):
    """A package with a distillation LoRA baked in (`vidrt export --lora`, manifest baked_loras): create takes
    recipe lightx2v-4step without loras, as `vidrt run` does (the baked LoRA fills the recipe's slot), and
    /v1/models says that recipe needs no LoRA there; the worker runs the job (the Worker class in this
    process). The same request on the plain package is still a 400 naming recipe."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI
    from vidrt.service.scaleout import Worker

    baked, _ = baked_package
    limits = ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50)
    request = {"prompt": "a red circle moving left", "recipe": "lightx2v-4step", "size": "32x32", "frames": 1,
               "seed": 3}

    def needs_lora(api: VideoAPI) -> bool:
        return next(r["needs_lora"] for r in api.capabilities()["recipes"] if r["name"] == "lightx2v-4step")

    plain = VideoAPI(load_manifest(package, verify=False).model, limits, str(package))
    with pytest.raises(ApiError) as err:
        plain.to_job(request)
    assert (err.value.status, err.value.param) == (400, "recipe") and needs_lora(plain), err.value.message
    api = VideoAPI(load_manifest(baked, verify=False).model, limits, str(baked))
    job, settings, _ = api.to_job(request)
    assert (settings.recipe, settings.steps, settings.loras) == ("lightx2v-4step", 4, ()) and not needs_lora(api)
    worker = Worker(str(baked), threads=1)
    try:
        reply = worker.run("job1", job.to_dict())
    finally:
        worker.close()
    assert reply["status"] == "completed", reply


def test_the_workers_lora_refusals_use_the_clients_names(package, tmp_path):
    """A queued job whose LoRAs became twins after create (a file replaced by a copy of another) fails in the
    worker named as the client named them, not by the server's paths; a job naming a file outside the worker's
    LoRA folder (restored after a restart with another --lora-dir) fails with lora_not_found, by bare name."""
    import shutil

    from vidrt.service.scaleout import Worker

    folder = tmp_path / "loras"
    folder.mkdir()
    _fitting_lora(folder / "a.safetensors", package)
    shutil.copy(folder / "a.safetensors", folder / "b.safetensors")
    worker = Worker(str(package), threads=1, lora_dir=str(folder))
    try:
        reply = worker.run("job1", {"prompt": "a red circle", "steps": 1,
                                    "loras": [f"{folder / 'a.safetensors'}:0.5", f"{folder / 'b.safetensors'}"]})
        elsewhere = shutil.copy(folder / "a.safetensors", tmp_path / "elsewhere.safetensors")  # readable, outside
        outside = worker.run("job2", {"prompt": "a red circle", "steps": 1, "loras": [f"{elsewhere}:0.5"]})
    finally:
        worker.close()
    assert reply["status"] == "failed", reply
    assert reply["error"].startswith("loras: 'b.safetensors' is the same file as loras: 'a.safetensors'"), reply
    assert str(tmp_path) not in reply["error"], reply
    assert (outside["status"], outside["code"]) == ("failed", "lora_not_found"), outside  # not run, not read
    assert outside["error"].startswith("loras: 'elsewhere.safetensors' is not in this server's LoRA folder"), outside
    assert str(tmp_path) not in outside["error"], outside


def test_a_workers_device_refusals_show_no_server_path_flag_or_fake_field(package):
    """A clip too large for the card (TensorRT's memory plan, here a stand-in budget of 1 MiB) fails with the
    job's fields only: no `vidrt plan` pointer with the server's package path and CLI flags. Settings a job
    cannot make (backend, VAE memory budget) are named as the workers' settings, never as a job field."""
    from vidrt.errors import arg, spelled_as
    from vidrt.service.api import API_FIELDS, api_text
    from vidrt.service.scaleout import Worker

    worker = Worker(str(package), threads=1, spelling=API_FIELDS)  # as `vidrt serve` starts its workers
    try:
        worker.pipe.backend.device_memory = lambda: (1 << 20, "fp32")
        reply = worker.run("job1", {"prompt": "a red circle moving left", "steps": 1})
    finally:
        worker.close()
    assert (reply["status"], reply["code"]) == ("failed", "device_error"), reply
    message = api_text(reply["error"])[0]
    assert "GiB are free; lower size or frames" in message, message
    assert "vidrt" not in message and "--" not in message and str(package) not in message, message
    with spelled_as(API_FIELDS):
        for name, value in (("backend", "onnxruntime"), ("vae_memory", None)):
            shown = arg(name, value)
            assert shown.startswith("the workers' ") and "not a job field" in shown and "--" not in shown, shown


def test_messages_a_server_client_reads_name_no_vidrt_command(package, monkeypatch):
    """A fix that is a `vidrt` command (or --debug) is named where the caller has the CLI (`vidrt`, a Python
    caller, a `vidrt batch` line) and said in words for a server's client, who has no shell (vidrt.errors:
    commands_shown, command_or, report_it); where the model's names are listed is each front end's own
    (catalog: `vidrt info`, GET /v1/models), in a job the workers run too (no rewriting of the message after
    it is raised). Failures of CUDA (faked: no GPU here), NaN out of a stage, TensorRT plans, LoRAs, caching."""
    from types import SimpleNamespace

    import vidrt.backends.cuda as cuda_module
    from vidrt.backends.cuda import CudaRuntime
    from vidrt.backends.kernels import _cu_check
    from vidrt.backends.refit import not_refittable, rebuild_fix
    from vidrt.caching import needs_pieces, teacache_coefficients
    from vidrt.cli.app import CLI_FLAGS
    from vidrt.errors import VidrtError, spelled_as
    from vidrt.lora import LoraMerger
    from vidrt.package.manifest import load_manifest
    from vidrt.package.recipes import all_recipes, find_recipe
    from vidrt.pipeline import _check_finite
    from vidrt.service.api import API_FIELDS, ApiError, ServeLimits, VideoAPI
    from vidrt.service.jobs import JOB_FIELDS
    from vidrt.service.scaleout import Worker

    def failing(*_: Any) -> Any:
        raise RuntimeError("no names in this fake")

    monkeypatch.setattr(cuda_module, "_load_cudart", lambda: SimpleNamespace(cudaGetErrorName=failing))
    manifest = load_manifest(package, verify=False)
    no_pieces = replace(manifest, components={k: v for k, v in manifest.components.items() if "." not in k})
    fp8 = replace(manifest, components={**manifest.components, "dit": replace(manifest.components["dit"],
                                                                             precision="fp8")})
    uncalibrated = replace(manifest, cache_table=None)

    def raises(call: Callable[[], Any]) -> Callable[[], str]:
        def message() -> str:
            with pytest.raises(VidrtError) as err:
                call()
            return str(err.value)
        return message

    def throw(exc: Exception) -> None:
        raise exc

    cases = {  # name -> (the message, what `vidrt` shows of the fix)
        "CUDA failure": (raises(lambda: CudaRuntime._check("cudaMemcpyAsync", 1)), "run with --debug and report it"),
        "CUDA out of memory": (raises(lambda: CudaRuntime._check("cudaMalloc", 2)), "`vidrt plan`"),
        "CUDA kernel": (raises(lambda: _cu_check(SimpleNamespace(cuGetErrorName=failing), "cuLaunchKernel", 700)),
                        "run with --debug and report it"),
        "NaN out of a stage": (raises(lambda: _check_finite("VAE decoder", np.array([np.nan]), "fp32", "")),
                               "`vidrt export`"),
        "plan not refittable": (raises(lambda: throw(not_refittable("dit", "vidrt build PKG --precision bf16"))),
                                "vidrt build PKG --precision bf16"),
        "plan to rebuild": (lambda: rebuild_fix("vidrt build PKG --precision bf16"), "vidrt build PKG"),
        "LoRA on FP8": (raises(lambda: LoraMerger(package, fp8, lambda s: None).weights("dit")),
                        "`vidrt export --lora`"),
        "cache without pieces": (raises(lambda: needs_pieces(no_pieces, "fbcache")), "`vidrt cache split"),
        "cache uncalibrated": (raises(lambda: teacache_coefficients(uncalibrated)), "`vidrt cache calibrate"),
        "unknown recipe": (raises(lambda: find_recipe("nope", all_recipes())), "(`vidrt info` lists them)"),
    }
    for name, (message, command) in cases.items():
        for spelling in (CLI_FLAGS, None, JOB_FIELDS):  # has the CLI: the command is named
            with spelled_as(spelling) if spelling is not None else contextlib.nullcontext():
                shown = message()
            assert command in shown or spelling is not CLI_FLAGS and "--debug" in command, (name, shown)
        with spelled_as(API_FIELDS):
            shown = message()
        assert not re.search(r"vidrt (export|build|plan|info|cache|run|serve)|--[a-z]", shown), (name, shown)
        assert str(package) not in shown and "PKG" not in shown and "PACKAGE" not in shown, (name, shown)
    with spelled_as(API_FIELDS):
        assert cases["CUDA failure"][0]().endswith("; report it to the server's operator")
        assert cases["unknown recipe"][0]().endswith(" (GET /v1/models lists them)")

    # the same refusal from a worker of `vidrt serve` (spelled as the API) and at create, as the client reads it
    api = VideoAPI(manifest.model, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), str(package))
    with pytest.raises(ApiError) as err:
        api.to_job({"prompt": "a red circle", "recipe": "nope"})
    assert err.value.message.endswith(" (GET /v1/models lists them)"), err.value.message
    worker = Worker(str(package), threads=1, spelling=API_FIELDS)
    try:
        reply = worker.run("job1", {"prompt": "a red circle", "recipe": "nope"})
    finally:
        worker.close()
    assert reply["status"] == "failed" and reply["error"].endswith(" (GET /v1/models lists them)"), reply


def test_a_workers_lora_error_names_the_lora_as_the_client_sent_it(package, tmp_path):
    """Create checks a LoRA's fit, but the file can change before a worker runs the job: the worker's own
    refusal names it as the client did (read_lora/lora_deltas get the worker's label), with no server path
    and no `vidrt run` flag. The Worker class itself, in this process (no Ray needed)."""
    from vidrt.service.scaleout import Worker

    (tmp_path / "loras").mkdir()
    bad = _lora_file(tmp_path / "loras" / "other-size.safetensors", rank_input=32)  # replaced after create
    worker = Worker(str(package), threads=1, lora_dir=str(tmp_path / "loras"))
    try:
        reply = worker.run("job1", {"prompt": "a red circle moving left", "steps": 1, "loras": [f"{bad}:0.5"]})
    finally:
        worker.close()
    assert reply["status"] == "failed", reply
    assert reply["error"].startswith("loras: 'other-size.safetensors' does not fit this model: "), reply
    assert str(tmp_path) not in reply["error"] and "--" not in reply["error"], reply


def test_caps_set_the_defaults_and_lora_strengths_are_checked(tmp_path):
    """--max-size/--max-frames under a model's defaults (1280x704, 121 frames): a request without size or
    length gets the largest listed size that fits (or the cap) and the cap's 4k+1 length, as /v1/models
    says; a LoRA strength that is not a number is a 400 at submit, without the server's path."""
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI

    tiny = load_manifest(default_package(), verify=False).model
    spec = replace(tiny, sampling=replace(tiny.sampling, sizes=((1280, 704), (704, 1280), (64, 48), (48, 64)),
                                          frames=121))
    for cap, frames, size, listed in (((64, 64), 5, (64, 48), ["64x48", "48x64"]),
                                      ((64, 64), 7, (64, 48), ["64x48", "48x64"]),
                                      ((32, 32), 121, (32, 32), [])):
        api = VideoAPI(spec, ServeLimits(max_pixels=cap[0] * cap[1], max_frames=frames, max_steps=50, max_size=cap))
        want = (frames - 1) // 4 * 4 + 1
        _, s, asked = api.to_job({"prompt": "a cat"})
        assert (s.width, s.height, s.num_frames, asked) == (*size, want, {})
        caps = api.capabilities()
        assert (caps["default_size"], caps["default_frames"], caps["sizes"]) == (f"{size[0]}x{size[1]}", want, listed)
        _, s, _ = api.to_job({"prompt": "a cat", "size": "32x32", "frames": 1})
        assert (s.width, s.height, s.num_frames) == (32, 32, 1)  # what a request names is kept
    uncapped = VideoAPI(spec, ServeLimits(max_pixels=1280 * 704, max_frames=121, max_steps=50))
    _, s, _ = uncapped.to_job({"prompt": "a cat"})
    assert (s.width, s.height, s.num_frames) == (1280, 704, 121)

    # a size that is not a multiple of 16: the nearest sizes this server makes, none over its pixel limit
    capped = VideoAPI(tiny, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50))
    for size, use in (("65x64", "use 64x64; "), ("65x63", "use 64x48 or 64x64 or 80x48; "),
                      ("4095x17", "no size near")):
        with pytest.raises(ApiError) as info:
            capped.to_job({"prompt": "a cat", "size": size})
        e = info.value
        assert (e.status, e.param) == (400, "size") and f"size {size} is not a multiple of 16" in e.message, e.message
        assert use in e.message and "80x64" not in e.message, e.message  # 5120 pixels: over this server's 4096

    _lora_file(tmp_path / "style.safetensors")
    api = VideoAPI(tiny, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), lora_dir=str(tmp_path))
    for bad in ("style.safetensors:nan", "style.safetensors:abc", "style.safetensors:inf", "style.safetensors:11",
                "dit_high=style.safetensors:x"):
        with pytest.raises(ApiError) as info:
            api.to_job({"prompt": "a cat", "loras": [bad]})
        e = info.value
        assert (e.status, e.param) == (400, "loras") and str(tmp_path) not in e.message, e.message
        assert "\n" not in e.message and "strength" in e.message and bad.rsplit(":", 1)[1] in e.message, e.message
    job, _, _ = api.to_job({"prompt": "a cat", "loras": ["style.safetensors:-0.5"]})
    assert [r.strength for r in job.to_request().loras] == [-0.5]


def test_lora_fit_check_on_a_package_without_its_weight_layout(tmp_path):
    """A package exported before vidrt recorded the DiT's weight layout takes no LoRAs: a 400 naming loras,
    without the server's package path (was a 500 once create began checking keys and shapes)."""
    from vidrt.lora import LoraMerger
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI

    package = default_package()
    manifest = load_manifest(package, verify=False)
    old = replace(manifest, components={**manifest.components, "dit": replace(manifest.components["dit"], weights={})})
    (tmp_path / "loras").mkdir()
    _fitting_lora(tmp_path / "loras" / "style.safetensors", package)
    api = VideoAPI(manifest.model, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), str(package),
                   lora_dir=str(tmp_path / "loras"))
    api.to_job({"prompt": "a cat", "loras": ["style.safetensors"]})  # fits the real layout
    api._merger, api._lora_checked = LoraMerger(package, old, lambda s: None), {}
    with pytest.raises(ApiError) as err:
        api.to_job({"prompt": "a cat", "loras": ["style.safetensors"]})
    assert (err.value.status, err.value.param, err.value.code) == (400, "loras", "loras_unsupported")
    assert str(package) not in err.value.message, err.value.message
    no_folder = VideoAPI(manifest.model, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), str(package))
    with pytest.raises(ApiError) as err:  # a server started without --lora-dir: the client is told, in words
        no_folder.to_job({"prompt": "a cat", "loras": ["style.safetensors"]})
    assert err.value.code == "loras_unsupported" and "operator" in err.value.message, err.value.message
    assert "vidrt" not in err.value.message and "--" not in err.value.message, err.value.message


def _png(size: tuple[int, int] = (64, 64), mode: str = "RGB", kind: str = "PNG") -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], len(mode)), np.uint8)
    Image.fromarray(pixels if mode != "CMYK" else pixels[..., :3]).convert(mode).save(buf, kind)
    return buf.getvalue()


def test_an_upload_is_checked_before_it_is_kept_and_goes_with_its_jobs(package, tmp_path, monkeypatch):
    """A server never reads what it will refuse: a request over a limit is refused before its input_reference
    is decoded or written; an image that cannot be used (not an image, too small, CMYK) is refused after it is
    decoded in memory, before it is written; a refused request leaves nothing in --out. A kept image is its
    jobs' file: removed with the last job that uses it (DELETE, --keep), and at restart if no job does."""
    import hashlib

    import vidrt.service.api as api_module
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI
    from vidrt.service.scaleout import JobManager
    from vidrt.service.store import DB_NAME, JobStore

    spec = load_manifest(package, verify=False).model
    if spec.image is None:
        pytest.skip("this package takes no start image")
    out = tmp_path / "out"
    out.mkdir()
    api = VideoAPI(spec, ServeLimits(max_pixels=64 * 64, max_frames=17, max_steps=50), str(package), out / "inputs")
    decoded: list[int] = []
    real_load = api_module.load_image
    monkeypatch.setattr(api_module, "load_image", lambda data, *a: decoded.append(len(data)) or real_load(data, *a))
    good = _png()
    for over, param in (({"steps": 51}, "steps"), ({"size": "128x128"}, "size"), ({"frames": 21}, "frames"),
                        ({"recipe": "nope"}, "recipe")):
        with pytest.raises(ApiError) as info:
            api.to_job({"prompt": "a red circle", **over}, good)
        assert info.value.param == param, info.value
    assert decoded == [] and list(out.iterdir()) == []
    for bad, needle in ((b"\0" * 100, "input_reference is not an image Pillow can read"),
                        (_png((10, 10)), "input_reference is 10x10; it needs at least 16 pixels"),
                        (_png(mode="CMYK", kind="JPEG"), "input_reference is CMYK")):
        with pytest.raises(ApiError) as info:
            api.to_job({"prompt": "a red circle", "steps": 4}, bad)
        assert (info.value.param, info.value.code) == ("input_reference", "image_invalid"), info.value
        assert info.value.message.startswith(needle) and str(tmp_path) not in info.value.message, info.value
    assert len(decoded) == 3 and list(out.iterdir()) == []  # decoded, refused, never written

    manager = JobManager(package, out, store=JobStore(out / DB_NAME), keep_seconds=60, inputs_dir=out / "inputs")
    jobs = []
    for image in (good, good, _png((48, 48))):
        job, settings, _ = api.to_job({"prompt": "a red circle", "steps": 4}, image)
        assert Path(job.image).parent == out / "inputs" and Path(settings.image) == Path(job.image)
        assert settings.image_sha256 == hashlib.sha256(image).hexdigest()  # as the worker's resolve records it
        jobs.append(manager.submit(job, settings))
    shared, other = Path(jobs[0].request.image), Path(jobs[2].request.image)
    assert jobs[1].request.image == str(shared) and len(list((out / "inputs").iterdir())) == 2
    manager.delete(jobs[0].id)
    assert shared.is_file()  # the second job still uses it
    manager.delete(jobs[1].id)
    assert not shared.exists() and other.is_file()
    manager._finish(jobs[2], "completed")
    assert manager.expire(now=time.time() + 120) == 1 and not other.exists()
    (out / "inputs" / f"input-{'0' * 32}").write_bytes(good)  # an image whose job was deleted while stopped
    (out / "inputs" / f".input-{'1' * 32}.4242.tmp").write_bytes(good)  # a crashed server's half-kept one
    (out / "inputs" / "mine.png").write_bytes(good)  # the operator's own: never removed
    kept, settings, _ = api.to_job({"prompt": "a red circle", "steps": 4}, good)
    manager.submit(kept, settings)
    manager.store.close()
    again = JobManager(package, out, store=JobStore(out / DB_NAME), inputs_dir=out / "inputs")
    assert again.restore()["orphans"] == 2
    assert sorted(p.name for p in (out / "inputs").iterdir()) == sorted([Path(kept.image).name, "mine.png"])
    again.store.close()


def test_crf_0_refusal_names_what_this_server_can_make(package):
    """Lossless H.264 is refused with the fix this API has (a crf), not a PNG folder it cannot make."""
    from vidrt.package.manifest import load_manifest
    from vidrt.service.api import ApiError, ServeLimits, VideoAPI

    api = VideoAPI(load_manifest(package, verify=False).model, ServeLimits(max_pixels=64 * 64, max_frames=17,
                                                                           max_steps=50))
    with pytest.raises(ApiError) as info:
        api.to_job({"prompt": "a red circle", "crf": 0})
    assert (info.value.param, info.value.status) == ("crf", 400)
    assert "crf 1..51" in info.value.message and "PNG" not in info.value.message, info.value.message
    api.to_job({"prompt": "a red circle", "crf": 0, "output_format": "webm"})  # VP9 takes 0

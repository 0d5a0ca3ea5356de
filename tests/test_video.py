"""vidrt.video: mp4 / webm / PNG-folder output, metadata, atomic publish, temp cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from vidrt.errors import OutputError, UsageError
from vidrt.video import (
    VideoWriter,
    clean_stale_temps,
    output_format,
    read_metadata,
    temp_path,
    to_uint8,
    write_video,
)

META = {"prompt": "a red fox runs through snow, 雪", "seed": 1234, "steps": 50, "guidance": 5.0}


def smooth_clip(n: int = 9, h: int = 64, w: int = 96) -> np.ndarray:
    """uint8 [n, h, w, 3]: slowly moving colour gradients (what 4:2:0 video codes well)."""
    t = np.arange(n)[:, None, None]
    y = np.arange(h)[None, :, None] / h
    x = np.arange(w)[None, None, :] / w
    r = 0.5 + 0.4 * np.sin(np.pi * (x + 0.03 * t))
    g = 0.5 + 0.4 * np.cos(np.pi * (y - 0.02 * t))
    b = 0.5 + 0.3 * np.sin(np.pi * (x + y) / 2)
    return np.rint(np.stack(np.broadcast_arrays(r, g, b), -1) * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def read_frames(path: Path) -> tuple[np.ndarray, av.VideoStream]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, stream


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".vidrt-" in p.name)


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_video_round_trip(tmp_path: Path, suffix: str) -> None:
    clip = smooth_clip()
    chunks = [clip[:1], clip[1:5], clip[5:]]  # streamed like the VAE: 1 frame, then 4 at a time
    out = write_video(tmp_path / f"clip{suffix}", chunks, fps=16, metadata=META)
    frames, stream = read_frames(out)
    assert frames.shape == clip.shape
    assert stream.average_rate == 16
    assert stream.codec_context.name == ("h264" if suffix == ".mp4" else "vp9")
    quality = psnr(frames, clip)
    print(f"{suffix}: PSNR {quality:.1f} dB, {out.stat().st_size} bytes")
    assert quality >= 35
    assert read_metadata(out) == META
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["l:0.mp4", "http:x.webm", "l:0.mkv"])
def test_metadata_reads_back_from_a_name_with_a_colon(tmp_path: Path, name: str, monkeypatch) -> None:
    """read_metadata on a file vidrt wrote as `-o l:0.mp4`: by its name, by ./name (what a shell passes),
    and absolute; FFmpeg would take "l:" for a URL protocol (tester report s7 item 14)."""
    out = write_video(tmp_path / name, [smooth_clip()[:3]], fps=8, metadata=META)
    monkeypatch.chdir(tmp_path)
    for path in (name, f"./{name}", out):
        assert read_metadata(path) == META, path


def test_float_frames_and_crf(tmp_path: Path) -> None:
    clip = smooth_clip(5)
    as_float = clip.astype(np.float32) / 127.5 - 1.0  # what vae_decode yields
    assert np.array_equal(to_uint8(as_float), clip)
    hi = write_video(tmp_path / "hi.mp4", [as_float], fps=24, crf=12)
    lo = write_video(tmp_path / "lo.mp4", [as_float], fps=24, crf=40)
    assert psnr(read_frames(hi)[0], clip) > psnr(read_frames(lo)[0], clip)
    assert read_frames(hi)[1].average_rate == 24


@pytest.mark.parametrize("name", ["frames/", "frames"])
def test_png_folder(tmp_path: Path, name: str) -> None:
    clip = smooth_clip(5, 30, 34)  # odd-free but not a multiple of 16: PNG takes any size
    out = write_video(tmp_path / name, [clip[:1], clip[1:]], fps=16, metadata=META)
    assert out == tmp_path / "frames" and out.is_dir()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["frame_000000.png", "frame_000001.png", "frame_000002.png", "frame_000003.png",
                     "frame_000004.png", "metadata.json"]
    for i in range(5):  # PNG is lossless
        frames, _ = read_frames(out / f"frame_{i:06d}.png")
        assert np.array_equal(frames[0], clip[i])
    assert read_metadata(out) == META
    side = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert side["video"] == {"fps": "16", "frames": 5, "width": 34, "height": 30}
    assert leftovers(tmp_path) == []


def test_output_format() -> None:
    assert output_format("a.mp4").kind == "mp4"
    assert output_format("a.WEBM").kind == "webm"
    assert output_format("out/").kind == "png"
    assert output_format("out").kind == "png"
    assert [output_format(f"a{s}").kind for s in (".mov", ".mkv", ".gif", ".png")] == ["mov", "mkv", "gif", "still"]
    with pytest.raises(UsageError, match="unsupported output type"):
        output_format("a.avi")


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "frames/", "clip.gif", "clip.mkv"])
def test_exception_mid_write_leaves_nothing(tmp_path: Path, name: str) -> None:
    clip = smooth_clip()

    def chunks():
        yield clip[:1]
        yield clip[1:5]
        raise RuntimeError("decoder blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        write_video(tmp_path / name, chunks(), fps=16)
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path: Path) -> None:
    clip = smooth_clip()
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "clip.mp4", fps=16) as out:
            out.write(clip[:4])
            assert out.temp is not None and out.temp.exists()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["clip.mp4", "frames/"])
def test_existing_output_refused_and_untouched(tmp_path: Path, name: str) -> None:
    clip = smooth_clip(5)
    first = write_video(tmp_path / name, [clip], fps=16, metadata={"seed": 1})
    snapshot = {p: p.read_bytes() for p in ([first] if first.is_file() else sorted(first.iterdir()))}
    with pytest.raises(OutputError, match="already exists") as err:
        write_video(tmp_path / name, [clip[::-1]], fps=16, metadata={"seed": 2})
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert leftovers(tmp_path) == []
    # overwrite=True replaces it in one step
    write_video(tmp_path / name, [clip[::-1]], fps=16, metadata={"seed": 2}, overwrite=True)
    assert read_metadata(first) == {"seed": 2}
    assert leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a vidrt PNG frame folder"):
        VideoWriter(tmp_path / "docs/", fps=16, overwrite=True)
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_odd_size_video_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="even width and height, got 33x24"):
        write_video(tmp_path / "odd.mp4", [np.zeros((2, 24, 33, 3), np.uint8)], fps=16)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_that_cannot_exist(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        VideoWriter(tmp_path / "file" / "clip.mp4", fps=16)
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        VideoWriter(tmp_path / "d.mp4", fps=16, overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            VideoWriter(ro / "clip.mp4", fps=16)
        with pytest.raises(OutputError, match="cannot create the output folder"):
            VideoWriter(ro / "sub" / "clip.mp4", fps=16)
    finally:
        ro.chmod(0o700)


def test_clean_stale_temps(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale_file = temp_path(tmp_path / "a.mp4", pid=dead_pid)
    stale_file.write_bytes(b"half")
    stale_dir = temp_path(tmp_path / "frames", pid=dead_pid)
    stale_dir.mkdir()
    (stale_dir / "frame_000000.png").write_bytes(b"x")
    mine = temp_path(tmp_path / "b.mp4")  # this process is alive: keep
    mine.write_bytes(b"in progress")
    old = temp_path(tmp_path / "c.mp4", pid=dead_pid, old=True)  # an output being replaced: restore
    old.write_bytes(b"previous output")
    unrelated = tmp_path / ".hidden.tmp"
    unrelated.write_bytes(b"not ours")
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert mine.exists() and unrelated.exists()
    assert (tmp_path / "c.mp4").read_bytes() == b"previous output"


# ---- colour, faststart, browser-playable CRFs, the other output forms (issue 17) ----------------

HD_COLOURS = [(0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 255), (16, 128, 200), (40, 40, 40)]


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov"])
def test_hd_solid_colours_decode_back_as_bt709(tmp_path, suffix):
    """What an HD player does: assume (and here also read) BT.709, limited range. Solid colours at
    1280x704 come back within 2 levels, and the stream carries the BT.709 tags."""
    frames = np.stack([np.full((704, 1280, 3), c, dtype=np.uint8) for c in HD_COLOURS])
    path = write_video(tmp_path / f"hd{suffix}", [frames], fps=16)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        cc = stream.codec_context
        tags = (cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range)
        decoded = [f.reformat(format="rgb24", src_colorspace="ITU709", src_color_range="MPEG").to_ndarray()
                   for f in container.decode(stream)]
        pix_fmt = cc.pix_fmt
    assert tags == (1, 1, 1, 1), f"primaries/transfer/matrix/range {tags}: want BT.709 (1, 1, 1) and limited (1)"
    assert pix_fmt == "yuv420p"
    for got, want in zip(decoded, HD_COLOURS, strict=True):
        worst = int(np.abs(got[300:400, 600:700].astype(int) - np.array(want)).max())
        assert worst <= 2, f"{want} decoded as {got[350, 650]} ({suffix})"


def _top_level_boxes(data: bytes) -> list[str]:
    boxes, i = [], 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        boxes.append(data[i + 4:i + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[i + 8:i + 16], "big")
        if size < 8:
            break
        i += size
    return boxes


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_moov_is_written_before_the_media_data(tmp_path, suffix):
    path = write_video(tmp_path / f"a{suffix}", [smooth_clip()], fps=16)
    boxes = _top_level_boxes(path.read_bytes())
    assert "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"), boxes


def test_crf_ranges_are_per_codec_and_h264_stays_browser_playable(tmp_path):
    from vidrt.errors import UsageError

    with pytest.raises(UsageError, match="High 4:4:4 Predictive"):
        VideoWriter(tmp_path / "a.mp4", fps=16, crf=0)
    for suffix, bad, good in ((".mp4", 52, 51), (".mov", 52, 51), (".mkv", 52, 51), (".webm", 64, 63)):
        with pytest.raises(UsageError, match=f"{bad}.*{good}"):
            VideoWriter(tmp_path / f"b{suffix}", fps=16, crf=bad)
        write_video(tmp_path / f"ok{suffix}", [smooth_clip(3)], fps=16, crf=good)
    assert list(tmp_path.glob(".*.tmp")) == []
    path = write_video(tmp_path / "low.mp4", [smooth_clip(3)], fps=16, crf=1)
    with av.open(str(path)) as c:
        assert c.streams.video[0].profile == "High"  # not High 4:4:4 Predictive, which browsers refuse


def test_gif_is_palette_optimised_and_keeps_its_metadata(tmp_path):
    from PIL import Image

    clip = smooth_clip(6)
    path = write_video(tmp_path / "a.gif", [clip[:3], clip[3:]], fps=8, metadata=META)
    with av.open(str(path)) as c:  # FFmpeg still decodes every frame past the inserted comment
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == clip.shape
    # a per-clip palette (palettegen) keeps smooth gradients close; the fixed 256-colour one would not
    assert psnr(decoded, clip) > 30, psnr(decoded, clip)
    assert path.read_bytes()[:6] == b"GIF89a"
    # the settings in a GIF Comment Extension (FFmpeg's muxer writes none), as ASCII JSON, read back whole
    assert read_metadata(path) == META
    with Image.open(path) as image:
        assert json.loads(image.info["comment"]) == META and image.n_frames == 6


def test_png_still_is_one_frame(tmp_path):
    frame = smooth_clip(1)
    path = write_video(tmp_path / "still.png", [frame], fps=8, metadata={"prompt": "a cat"})
    with av.open(str(path)) as c:
        assert np.array_equal(next(c.decode(video=0)).to_ndarray(format="rgb24"), frame[0])
    with pytest.raises(OutputError, match="one frame"):
        write_video(tmp_path / "two.png", [smooth_clip(2)], fps=8)
    assert not (tmp_path / "two.png").exists() and list(tmp_path.glob(".*.tmp")) == []


def test_read_metadata_of_a_missing_or_foreign_file_is_a_usage_error(tmp_path: Path) -> None:
    """A path that does not exist, a JSONL / text file (FFmpeg opens some as subtitles), a .png or .gif
    that is not an image: UsageError naming the file and the fix, never FileNotFoundError / av's errors."""
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a cat"}\n')
    (tmp_path / "notes.txt").write_text("[00:01.00] a line\n")  # FFmpeg's lrc demuxer takes this
    (tmp_path / "fake.png").write_text("not a png")
    (tmp_path / "fake.gif").write_text("not a gif")
    with pytest.raises(UsageError, match="nope.mp4 does not exist; give the path of a clip"):
        read_metadata(tmp_path / "nope.mp4")
    for name in ("jobs.jsonl", "notes.txt", "fake.png", "fake.gif"):
        with pytest.raises(UsageError, match=f"cannot read metadata from .*{name}: not a video or image") as err:
            read_metadata(tmp_path / name)
        assert "\n" not in str(err.value) and "vidrt wrote" in str(err.value)

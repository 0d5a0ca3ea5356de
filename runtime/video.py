"""Write decoded frames to .mp4 / .mov / .mkv (H.264), .webm (VP9), .gif, one .png still or a folder of
PNG frames, with PyAV.

Video files are browser-playable: yuv420p converted from RGB with the BT.709 matrix in limited range
and tagged BT.709 (primaries, transfer, matrix, range), as HD players assume; mp4/mov put the `moov`
index first (faststart) so playback starts before the download ends; H.264 CRFs stay in 1..51 (CRF 0
is lossless only in the High 4:4:4 Predictive profile, which browsers refuse). A GIF gets a palette made
for the clip (FFmpeg palettegen + paletteuse), written when the last frame is in.

Frames arrive in chunks as the VAE decodes them and are encoded at once. Everything goes to a
temporary file (or folder) beside the output, named `.<name>.vidrt-<pid>.tmp`, which is renamed
onto the output only when complete, so a crash or Ctrl-C never leaves a half-written video and never
damages an existing one. `clean_stale_temps` removes the temps of processes that died anyway
(SIGKILL, power loss).

The prompt, seed, settings, recipe and LoRAs (file name and strength) go into the file: a JSON object
in the container's `comment` tag (mp4, webm, mkv, mov; the prompt also as `title`, which players show),
in a GIF Comment Extension (GIF89a section 24; FFmpeg's GIF muxer writes none, so it is inserted after
the global colour table, as ASCII JSON), in an iTXt chunk of a .png still, or in `metadata.json` beside
the frames of a PNG folder. `read_metadata` reads each back.

A GIF stores each frame's delay in centiseconds (GIF89a section 23), so 8 fps (125 ms) is written as
130 ms (FFmpeg rounds up) and plays at ~7.7 fps; 16 fps as 60 or 70 ms. That is the format's limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from vidrt.errors import OutputError, UsageError, arg, cannot_write_in

if TYPE_CHECKING:
    from vidrt.request import Settings

SIDECAR = "metadata.json"  # in a PNG folder
FRAME_NAME = "frame_{:06d}.png"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.vidrt-(?P<pid>\d+)(?P<old>\.old)?\.tmp$")


@dataclass(frozen=True)
class OutputFormat:
    kind: str  # "mp4" | "mov" | "mkv" | "webm" | "gif" | "still" (one .png) | "png" (a folder of frames)
    codec: str  # libx264 | libvpx-vp9 | gif | png
    default_crf: int | None  # constant-quality level; lower = better (x264: 18 ~ visually lossless)
    options: tuple[tuple[str, str], ...] = ()
    crf_range: tuple[int, int] | None = None  # the CRFs this codec takes here; None: no quality level
    container: str = ""  # FFmpeg muxer name (mkv: matroska)
    container_options: tuple[tuple[str, str], ...] = ()

    @property
    def is_video(self) -> bool:
        return self.crf_range is not None


# H.264: CRF 0 means lossless, which x264 codes only in the High 4:4:4 Predictive profile (even for
# 4:2:0) and browsers do not decode it, so 1..51 (x264's scale ends at 51). faststart: FFmpeg's mov
# muxer moves `moov` before `mdat` when the file is finished.
_H264 = {"codec": "libx264", "default_crf": 18, "crf_range": (1, 51)}
_FASTSTART = (("movflags", "+faststart"),)
FORMATS = {
    ".mp4": OutputFormat("mp4", container="mp4", container_options=_FASTSTART, **_H264),  # type: ignore[arg-type]
    ".mov": OutputFormat("mov", container="mov", container_options=_FASTSTART, **_H264),  # type: ignore[arg-type]
    ".mkv": OutputFormat("mkv", container="matroska", **_H264),  # type: ignore[arg-type]
    # VP9 constant quality needs b:v 0 (its CRF 0 is not lossless: profile 0, 4:2:0, playable); row-mt uses
    # both cores on small frames.
    ".webm": OutputFormat("webm", "libvpx-vp9", 31, (("b:v", "0"), ("row-mt", "1")), (0, 63), "webm"),
    ".gif": OutputFormat("gif", "gif", None, container="gif"),
    ".png": OutputFormat("still", "png", None),
}
PNG = OutputFormat("png", "png", None)
# BT.709 (AVCOL_PRI/TRC/SPC_BT709 = 1) in limited range (AVCOL_RANGE_MPEG = 1): what HD players assume.
BT709, LIMITED_RANGE = 1, 1


def output_format(path: str | os.PathLike[str]) -> OutputFormat:
    """.mp4 / .mov / .mkv / .webm / .gif / .png -> that file; a path ending in '/' or without a suffix ->
    a PNG folder."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        return PNG
    suffix = Path(text).suffix.lower()
    if not suffix:
        return PNG
    if suffix in FORMATS:
        return FORMATS[suffix]
    raise UsageError(f"{text}: unsupported output type {suffix!r}; use .mp4, .webm, .mkv, .mov, .gif, .png "
                      f"(one frame), or a folder path ending in '/' for PNG frames")


def check_crf(fmt: OutputFormat, crf: int | None, flag: str | None = None) -> None:
    """Refuse a CRF this codec cannot take, or one that would make the file unplayable in browsers.
    flag: how messages name it (default: the caller's spelling of `crf`, vidrt.errors.arg)."""
    if crf is None:
        return
    flag = flag or arg("crf")
    if fmt.crf_range is None:
        raise UsageError(f"{flag} sets the quality of video files (.mp4, .webm, .mkv, .mov); a {fmt.kind} "
                         f"output has none: leave {flag} out")
    lo, hi = fmt.crf_range
    if crf == 0 and lo == 1:
        raise UsageError(f"{flag} 0 is lossless H.264, which exists only in the High 4:4:4 Predictive profile "
                         f"that browsers do not play; use {flag} 1..51 (18 looks lossless), or a PNG folder "
                         f"for exact frames")
    if not lo <= crf <= hi:
        raise UsageError(f"{flag} {crf} is out of range for {fmt.codec} (.{fmt.kind}); use {lo}..{hi}, "
                         f"lower is better (default {fmt.default_crf})")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 [0, 255], rounded to nearest (as diffusers' video post-processing)."""
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.rint((frames.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _shortest(value: float) -> str:
    """The shortest text that reads back as `value` (1000.0 -> "1000", 937.25 -> "937.25")."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def clip_metadata(settings: Settings, model_name: str) -> dict[str, Any]:
    """What goes into the file (same for run, batch and serve, so their files are identical): every
    setting that changes the frames, so the file says how to make it again. Beyond the fixed keys, where
    they apply: "timesteps" (an explicit list, "1000,750,500,250"), "cache" (METHOD[:THRESHOLD], not
    "none"), "recipe": NAME, "image" / "last_image" (the file's name, or "array WxH") with
    "image_sha256" / "last_image_sha256", and "loras" (settings.loras: every LoRA of the clip, those
    baked into the package first, then the pipeline's, the recipe's and the request's): a list of
    "FILE:STRENGTH" (A14B one expert: "dit_high=FILE:STRENGTH"; baked: "FILE:STRENGTH baked"). Files are
    named without their folders: a server's or user's folders stay out of the file."""
    s = settings
    meta: dict[str, Any] = {
        "prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": str(s.seed), "model": model_name,
        "steps": str(s.steps), "shift": str(s.shift), "guidance": f"{s.guidance_high_noise}/{s.guidance_low_noise}",
        "scheduler": s.scheduler, "size": f"{s.width}x{s.height}", "frames": str(s.num_frames), "software": "vidrt"}
    if s.timesteps is not None:
        meta["timesteps"] = ",".join(_shortest(t) for t in s.timesteps)  # exact: fractional ones are fed as given
    if s.cache != "none":
        meta["cache"] = s.cache
    if s.recipe is not None:
        meta["recipe"] = s.recipe
    for key, source, digest in (("image", s.image, s.image_sha256), ("last_image", s.last_image, s.last_image_sha256)):
        if source is not None:
            meta[key] = Path(source).name  # "array WxH" stays as it is
            if digest is not None:
                meta[f"{key}_sha256"] = digest
    if s.loras:
        meta["loras"] = [f"{r.expert + '=' if r.expert else ''}{Path(r.path).name}:{r.strength:g}"
                         f"{' baked' if r.baked else ''}" for r in s.loras]
    return meta


def temp_path(final: Path, pid: int | None = None, old: bool = False) -> Path:
    """`.<name>.vidrt-<pid>.tmp` beside `final` (recognisable by clean_stale_temps)."""
    return final.parent / f".{final.name}.vidrt-{os.getpid() if pid is None else pid}{'.old' if old else ''}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temps that dead vidrt processes left in `folder`; returns what was removed.

    A `.old` temp is an output a dead process was replacing: if the output itself is gone it is
    put back rather than deleted. (The pid test is per machine: do not share a folder between hosts
    that write into it at the same time.)
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if m is None or _pid_alive(int(m["pid"])):
            continue
        final = folder / m["name"]
        if m["old"] and not final.exists():
            os.replace(entry, final)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _is_vidrt_frame_folder(path: Path) -> bool:
    """True for an empty folder or one holding only what a PNG-folder output writes."""
    return all(p.name == SIDECAR or re.fullmatch(r"frame_\d+\.png", p.name) for p in path.iterdir())


def check_replaceable(path: Path, fmt: OutputFormat) -> None:
    """What `--overwrite` may replace at an existing output path (vidrt run, and each line of vidrt batch):
    a PNG-folder output only a folder of what a PNG-folder output writes, any other output only a file;
    OutputError otherwise (never deletes a folder of someone else's files)."""
    if fmt.kind == "png":
        if not path.is_dir() or not _is_vidrt_frame_folder(path):
            raise OutputError(f"{path} exists and is not a vidrt PNG frame folder; refusing to replace it")
    elif path.is_dir():
        raise OutputError(f"{path} is a folder; give a file path for a {path.suffix or fmt.kind} output")


class VideoWriter:
    """Encode frame chunks as they come; `close()` publishes the file, `abort()` removes the temp.

    Use as a context manager: on any exception (KeyboardInterrupt included) the temp is removed and
    the output path is left as it was.

        with VideoWriter("clip.mp4", fps=16, metadata={"prompt": p, "seed": 42}) as out:
            for chunk in iter_decode(...):
                out.write(chunk)          # [n, H, W, 3] uint8, or float in [-1, 1]
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: float | Fraction, crf: int | None = None,
                 metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
        self.format = output_format(path)
        check_crf(self.format, crf)
        self.path = Path(os.fspath(path).rstrip("/" + os.sep) or ".").absolute()
        self.fps = Fraction(fps).limit_denominator(1001)
        if self.fps <= 0:
            raise OutputError(f"{self.path}: fps must be positive, got {fps}")
        self.crf = self.format.default_crf if crf is None else crf
        self.metadata = dict(metadata or {})
        try:
            self._meta_json = json.dumps(self.metadata, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise OutputError(f"{self.path}: metadata is not JSON-serialisable ({exc})") from None
        self.overwrite = overwrite
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height), set by the first frame
        self._check_target()
        self.temp: Path | None = temp_path(self.path)
        self._container: Any = None
        self._file: Any = None
        self._stream: Any = None
        self._png: Any = None
        self._gif: Any = None  # (filter graph, its buffer source, its sink) while a GIF is written
        self._open_temp()

    # -- setup ---------------------------------------------------------------------------------

    def _check_target(self) -> None:
        p = self.path
        if p.exists() or p.is_symlink():
            if not self.overwrite:
                raise OutputError(f"{p} already exists; choose another path or pass {arg('overwrite', True)}")
            check_replaceable(p, self.format)
        fix = "give an output path in a folder you can write to"
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {p.parent} ({exc.strerror or exc}); {fix}") from None
        if not os.access(p.parent, os.W_OK | os.X_OK):
            try:  # access() says no, not why: creating a file there gives the system's reason (a read-only
                # mount, a permission); where it works after all, _open_temp decides
                with tempfile.TemporaryFile(dir=p.parent, prefix=".vidrt-probe-"):
                    pass
            except OSError as exc:
                raise cannot_write_in(f"the output folder {p.parent}", exc, fix) from None

    def _open_temp(self) -> None:
        temp = self.temp
        assert temp is not None
        try:
            if self.format.kind == "png":
                temp.mkdir()
            elif self.format.kind == "still":
                self._file = open(temp, "xb")  # closed in close() / _discard()
            else:
                # Our own file object: the temp exists from now on (FFmpeg would create it only at the
                # first packet) and "x" refuses to follow anything already there; readable too, for
                # faststart's second pass that moves `moov` to the front.
                self._file = open(temp, "x+b", buffering=0)  # closed in close() / _discard()
                self._container = av.open(self._file, "w", format=self.format.container,
                                          options=dict(self.format.container_options))
                self._container.metadata["comment"] = self._meta_json
                prompt = self.metadata.get("prompt")
                if isinstance(prompt, str):
                    self._container.metadata["title"] = prompt
        except (OSError, av.FFmpegError) as exc:
            self._discard()
            raise OutputError(f"cannot write {self.path}: {_reason(exc)}; write it to a folder of a normal, "
                              f"writable file system instead (e.g. ./{self.path.name})") from None

    def _start_stream(self, width: int, height: int) -> None:
        if self.format.kind in ("png", "still"):
            self._png = av.CodecContext.create("png", "w")
            self._png.width, self._png.height, self._png.pix_fmt = width, height, "rgb24"
            return
        if self.format.kind == "gif":
            self._stream = self._container.add_stream("gif", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "pal8"
            self._gif = _gif_palette_graph(width, height, self.fps)
            return
        if width % 2 or height % 2:
            raise OutputError(f"{self.path}: {self.format.kind} (yuv420p) needs an even width and height, got "
                              f"{width}x{height}; crop the frames or write a PNG folder")
        stream = self._container.add_stream(self.format.codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        cc = stream.codec_context  # the tags go into the H.264 VUI / VP9 header and the container
        cc.color_primaries = cc.color_trc = cc.colorspace = BT709
        cc.color_range = LIMITED_RANGE
        stream.options = {"crf": str(self.crf), **dict(self.format.options)}
        self._stream = stream

    # -- writing -------------------------------------------------------------------------------

    def write(self, frames: np.ndarray) -> None:
        """Append frames: [n, H, W, 3] or [H, W, 3]; uint8, or float in [-1, 1]."""
        temp = self.temp
        if temp is None:
            raise ValueError("write() after close() or abort()")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [n, H, W, 3], got {frames.shape}")
        frames = to_uint8(frames)
        height, width = frames.shape[1:3]
        try:
            if self.size is None:
                self._start_stream(width, height)
                self.size = (width, height)
            elif self.size != (width, height):
                raise ValueError(f"frame size changed from {self.size[0]}x{self.size[1]} to {width}x{height}")
            for frame in frames:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                if self.format.kind == "still":
                    if self.frames_written:
                        raise OutputError(f"{self.path}: a .png holds one frame and this clip has more; "
                                          f"pass {arg('num_frames', 1)}, or a folder path ending in '/' for PNG frames")
                    self._file.write(_with_png_text(b"".join(bytes(p) for p in self._png.encode(vf)),
                                                    "comment", self._meta_json))
                elif self._png is not None:
                    data = b"".join(bytes(p) for p in self._png.encode(vf))
                    (temp / FRAME_NAME.format(self.frames_written)).write_bytes(data)
                elif self._gif is not None:
                    vf.pts, vf.time_base = self.frames_written, 1 / self.fps
                    self._gif[1].push(vf)
                else:
                    # RGB -> Y'CbCr with the BT.709 matrix in limited range (swscale), tagged to match
                    yuv = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG",
                                      dst_color_trc=BT709, dst_color_primaries=BT709)
                    for packet in self._stream.encode(yuv):
                        self._container.mux(packet)
                self.frames_written += 1
        except (OSError, av.FFmpegError) as exc:
            raise OutputError(f"writing {self.path} failed: {_reason(exc)}") from None

    def close(self) -> Path:
        """Flush, then move the finished temp onto the output path. Returns the output path."""
        if self.temp is None:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise OutputError(f"{self.path}: no frames to write")
        try:
            if self.format.kind == "png":
                sidecar = {"video": {"fps": str(self.fps), "frames": self.frames_written,
                                     "width": self.size[0] if self.size else 0,
                                     "height": self.size[1] if self.size else 0},
                           "metadata": self.metadata}
                (self.temp / SIDECAR).write_text(json.dumps(sidecar, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
            elif self.format.kind == "still":
                self._file.close()
                self._file = None
            else:
                if self._gif is not None:
                    self._flush_gif()
                for packet in self._stream.encode():  # flush the encoder
                    self._container.mux(packet)
                self._container.close()
                self._container = None
                self._file.close()
                self._file = None
                if self.format.kind == "gif":
                    _add_gif_comment(self.temp, json.dumps(self.metadata, ensure_ascii=True, sort_keys=True))
            self._publish()
        except (OSError, av.FFmpegError) as exc:
            self.abort()
            raise OutputError(f"writing {self.path} failed: {_reason(exc)}") from None
        except BaseException:
            self.abort()
            raise
        self.temp = None
        return self.path

    def _flush_gif(self) -> None:
        """End of input: palettegen emits the clip's palette, paletteuse maps every frame to it."""
        _graph, source, sink = self._gif
        source.push(None)
        n = 0
        while True:
            try:
                frame = sink.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            frame.pts = n
            n += 1
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self._gif = None

    def _publish(self) -> None:
        final, temp = self.path, self.temp
        assert temp is not None
        if self.format.kind == "png":
            if final.exists():  # overwrite (checked in _check_target): swap the old folder out first
                if not self.overwrite:
                    raise OutputError(f"{final} appeared while writing; the new frames were discarded")
                old = temp_path(final, old=True)
                os.replace(final, old)
                os.replace(temp, final)
                _remove(old)
            else:
                os.replace(temp, final)
            return
        if self.overwrite:
            os.replace(temp, final)  # atomic: readers see the old file or the new one
            return
        try:  # no-clobber publish: link fails if the output appeared meanwhile
            os.link(temp, final)
        except FileExistsError:
            raise OutputError(f"{final} appeared while writing; the new video was discarded") from None
        except OSError:  # no hard links on this file system
            if final.exists():
                raise OutputError(f"{final} appeared while writing; the new video was discarded") from None
            os.replace(temp, final)
            return
        temp.unlink()

    def abort(self) -> None:
        """Drop everything written so far; the output path is left untouched."""
        self._discard()
        self.temp = None

    def _discard(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        if self._file is not None:
            with contextlib.suppress(OSError):  # e.g. ENOSPC flushing what is being thrown away
                self._file.close()
            self._file = None
        if self.temp is not None:
            _remove(self.temp)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _gif_palette_graph(width: int, height: int, fps: Fraction) -> tuple[Any, Any, Any]:
    """buffer -> split -> palettegen (one palette from every frame) -> paletteuse -> sink: FFmpeg's
    recipe for good GIF colours (its default is a fixed 256-colour palette)."""
    graph = av.filter.Graph()
    source = graph.add_buffer(width=width, height=height, format="rgb24", time_base=1 / fps)
    split = graph.add("split")
    palettegen = graph.add("palettegen", "stats_mode=full")
    paletteuse = graph.add("paletteuse", "dither=sierra2_4a")
    sink = graph.add("buffersink")
    source.link_to(split)
    split.link_to(paletteuse, 0, 0)
    split.link_to(palettegen, 1, 0)
    palettegen.link_to(paletteuse, 0, 1)
    paletteuse.link_to(sink)
    graph.configure()
    return graph, source, sink


def _add_gif_comment(path: Path, text: str) -> None:
    """Insert a Comment Extension (GIF89a section 24: 0x21 0xFE, sub-blocks of at most 255 bytes, a 0
    terminator) after the header, the logical screen descriptor and the global colour table, where
    readers (Pillow: Image.info["comment"]) find it before the first frame. `text`: 7-bit ASCII, as
    the spec asks."""
    data = path.read_bytes()
    packed = data[10]  # logical screen descriptor: width, height (2 bytes each), then this
    at = 13 + (3 << ((packed & 0x07) + 1) if packed & 0x80 else 0)
    raw = text.encode("ascii")
    blocks = b"".join(bytes([len(raw[i:i + 255])]) + raw[i:i + 255] for i in range(0, len(raw), 255))
    path.write_bytes(data[:at] + b"\x21\xfe" + blocks + b"\x00" + data[at:])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _with_png_text(png: bytes, key: str, text: str) -> bytes:
    """The PNG with an iTXt (UTF-8) chunk `key` = text before its IEND chunk (the last 12 bytes)."""
    itxt = key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")  # no compression, no language
    return png[:-12] + _png_chunk(b"iTXt", itxt) + png[-12:]


def _png_text(data: bytes) -> dict[str, str]:
    out, i = {}, 8
    while i + 8 <= len(data):
        n, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind == b"iTXt":
            key, _, rest = data[i + 8:i + 8 + n].partition(b"\0")
            out[key.decode("latin-1")] = rest[2:].split(b"\0", 2)[-1].decode("utf-8", "replace")
        i += 12 + n
    return out


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())  # one line


def write_video(path: str | os.PathLike[str], frames: Iterable[np.ndarray], *, fps: float | Fraction,
                crf: int | None = None, metadata: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """Write every chunk of `frames` (e.g. vae_decode.iter_decode(...)) to `path`; see VideoWriter."""
    with VideoWriter(path, fps=fps, crf=crf, metadata=metadata, overwrite=overwrite) as out:
        for chunk in frames:
            out.write(chunk)
    return out.path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata mapping a VideoWriter stored in `path` ({} if there is none): a video file, a still
    (.png / .gif), or a PNG frame folder (its sidecar).
    Raises UsageError (one line naming the file): `path` does not exist, cannot be read, or is not a
    video / image (a file FFmpeg finds no video stream in, a .png without the PNG signature...)."""
    p = Path(path)
    fix = "give the path of a clip, still or PNG frame folder vidrt wrote"
    try:
        tags = _read_tags(p)
    except FileNotFoundError:
        raise UsageError(f"{p} does not exist; {fix}") from None
    except (OSError, ValueError, av.FFmpegError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise UsageError(f"cannot read metadata from {p}: not a video or image vidrt reads ({_reason(exc)}); "
                         f"{fix}") from None
    try:
        return dict(json.loads(tags.get("comment", "{}")))
    except (json.JSONDecodeError, TypeError):
        return {}


def _read_tags(p: Path) -> dict[str, str]:
    """The container's / image's text tags (the metadata JSON is under "comment"); OSError / ValueError /
    av.FFmpegError where `p` is missing or not a video or image."""
    if p.is_dir():
        sidecar = p / SIDECAR
        if not sidecar.is_file():
            return {}
        return {"comment": json.dumps(json.loads(sidecar.read_text(encoding="utf-8")).get("metadata", {}))}
    if p.suffix.lower() == ".png":
        data = p.read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("no PNG signature")
        return _png_text(data)
    if p.suffix.lower() == ".gif":
        from PIL import Image

        with Image.open(p) as image:
            comment = image.info.get("comment", b"{}")
        return {"comment": comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)}
    # a file object, not the name: FFmpeg reads "l:0.mp4" as the URL protocol "l" (as VideoWriter writes)
    with open(p, "rb") as file, av.open(file) as container:
        if not container.streams.video:  # FFmpeg opens a text file as subtitles (lrc), a .wav as audio
            raise ValueError(f"no video stream; FFmpeg reads it as {container.format.name}")
        return {k.lower(): v for k, v in container.metadata.items()}
        return dict(json.loads(sidecar.read_text(encoding="utf-8")).get("metadata", {}))
    if p.suffix.lower() == ".png":
        tags = _png_text(p.read_bytes())
    elif p.suffix.lower() == ".gif":
        from PIL import Image

        with Image.open(p) as image:
            comment = image.info.get("comment", b"{}")
        tags = {"comment": comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)}
    else:
        # a file object, not the name: FFmpeg reads "l:0.mp4" as the URL protocol "l" (as VideoWriter writes)
        with open(p, "rb") as file, av.open(file) as container:
            tags = {k.lower(): v for k, v in container.metadata.items()}
    try:
        return dict(json.loads(tags.get("comment", "{}")))
    except (json.JSONDecodeError, TypeError):
        return {}

"""User-facing errors: one line each, one exit code per class (the CLI prints `error: <msg>`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field


class VidrtError(Exception):
    """Base class. `str(err)` is the whole one-line message: what is wrong and how to fix it."""

    exit_code = 1


class UsageError(VidrtError):
    """A bad option or value on the command line or in the API call."""

    exit_code = 2


class PackageError(VidrtError):
    """A model package or checkpoint folder that is missing, partial, tampered or of another kind."""

    exit_code = 3


class DeviceError(VidrtError):
    """The backend or device cannot run this (no GPU, wrong TensorRT, NaN in a stage, ...)."""

    exit_code = 4


class OutputError(VidrtError):
    """The output path cannot be written (exists, unwritable folder, full disk)."""

    exit_code = 5


def cannot_write_in(what: str, exc: OSError, fix: str = "give a folder you can write to") -> OutputError:
    """The one wording of a folder vidrt cannot create or write in (`vidrt batch/serve/export --out`, the
    folder of `vidrt run -o`): `cannot write in WHAT (the system's reason: Read-only file system,
    Permission denied, No space left on device...); FIX`. `what` names the folder as the caller gave it
    (`--out /data/pkg`, `the output folder /data`)."""
    return OutputError(f"cannot write in {what} ({exc.strerror or exc}); {fix}")


class Cancelled(VidrtError):
    """A job stopped on request (between denoising steps or decoded frames); nothing was written."""

    exit_code = 130


# ---- how messages name the caller's arguments -------------------------------------------------------
# The library's messages name an argument with arg("num_frames"): a Python caller reads the keyword it
# used (`num_frames`, `overwrite=True`); a front end installs its own names for the length of a call
# (spelled_as): `vidrt` its flags (vidrt.cli.app.CLI_FLAGS: `--frames`, `--overwrite`), the job API its
# JSON fields. One table per front end; no message is rewritten after it is raised.


@dataclass(frozen=True)
class Spelling:
    """A front end's names for the library's keyword arguments. `names`: keyword -> name where it is not
    the default; the default is `--kebab-case` when `flags`, else the keyword itself. Values follow a
    flag after a space (`--frames 17`, a True value: the bare flag); in Python they follow `=` (repr)."""

    names: Mapping[str, str]
    flags: bool = True
    # keyword -> words, for settings this front end's caller cannot make (the job API: the backend, device,
    # VAE memory budget are the workers', set by whoever runs them): named so, never as a field or a flag
    workers: Mapping[str, str] = field(default_factory=dict)
    # may a message point to a `vidrt` command (commands_shown)? The caller has the CLI and the package:
    # `vidrt`, a `vidrt batch` line. False for a server's client (no shell; the command would show the
    # server's paths): the message says what the server's operator would do instead.
    commands: bool = True
    # where this front end's caller finds the model's names (recipes, sizes, LoRAs): catalog()
    catalog: str = "`vidrt info`"


_SPELLING: ContextVar[Spelling | None] = ContextVar("vidrt_spelling", default=None)

# Arguments a Python caller writes in another shape than `name=value` (LoRAs are a list of refs).
PYTHON_FORMS = {
    "lora": "loras=[({v!r}, 1.0)]",
    "lora_high_noise": "loras=[LoraRef({v!r}, expert='dit_high')]",
    "lora_low_noise": "loras=[LoraRef({v!r}, expert='dit_low')]",
}


def arg(name: str, value: object = None) -> str:
    """Keyword argument `name` (of Pipeline.load / __call__, Request, VideoWriter) as the caller writes it:
    `name` or `name=value!r` from Python (PYTHON_FORMS where it differs); under spelled_as(s): s's name for
    it, then the value (double-quoted when it holds a space)."""
    spelling = _SPELLING.get()
    if spelling is None:
        if value is None:
            return "loras" if name in PYTHON_FORMS else name
        return PYTHON_FORMS.get(name, f"{name}={{v!r}}").format(v=value)
    if name in spelling.workers:
        shown = "" if value is None or value is True else f" {value}"
        return f"the workers' {spelling.workers[name]}{shown} (set by whoever runs them, not a job field)"
    own = spelling.names.get(name, "--" + name.replace("_", "-") if spelling.flags else name)
    if value is None or value is True:
        return own
    text = str(value)
    return f'{own} "{text}"' if " " in text else f"{own} {text}"


@contextlib.contextmanager
def spelled_as(spelling: Spelling) -> Iterator[None]:
    """Messages raised inside name arguments as `spelling` does (this thread / asyncio task only)."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


def commands_shown() -> bool:
    """May a message point to a `vidrt` command (`vidrt plan ...`)? Yes for `vidrt` itself, a `vidrt batch`
    line and a Python caller (all on a machine that has the package and the CLI); no for a server's client
    (Spelling.commands False: no shell there, and the command would show the server's package path)."""
    spelling = _SPELLING.get()
    return spelling is None or spelling.commands


def command_or(command: str, otherwise: str) -> str:
    """A fix that is a `vidrt` command, as this caller can act on it: `command` where commands_shown(),
    else `otherwise` (the same fix in words, as the server's operator's part: no command, flag or path)."""
    return command if commands_shown() else otherwise


def report_it() -> str:
    """The end of a message about a failure that is vidrt's or the driver's, not the caller's: `vidrt` has
    --debug for the traceback; a Python caller has it already, a batch line in the worker's log; a server's
    client can only tell the server's operator."""
    if flags_shown():
        return "run with --debug and report it"
    return "report it" if commands_shown() else "report it to the server's operator"


def catalog() -> str:
    """Where this caller finds the model's names (`unknown recipe 'x'; use one of a, b (`vidrt info` lists
    them)`): `vidrt info` for `vidrt`, a batch line and Python; the front end's own place otherwise
    (a server's client: GET /v1/models)."""
    spelling = _SPELLING.get()
    return "`vidrt info`" if spelling is None else spelling.catalog


def flags_shown() -> bool:
    """Is the caller `vidrt` (a spelling of command-line flags)? For values a flag takes in another form than
    the keyword (`--device 3` vs Pipeline.load(device="cuda:3"))."""
    spelling = _SPELLING.get()
    return spelling is not None and spelling.flags


def python_caller() -> bool:
    """Is the caller Python (no front end's spelling installed)? For a fix whose form differs in kind
    between a keyword's value and a job's JSON field (a list item `"dit_high=FILE"`)."""
    return _SPELLING.get() is None

"""User-facing errors: one line each, one exit code per class (the CLI prints `error: <msg>`)."""

from __future__ import annotations


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


class Cancelled(VidrtError):
    """A job stopped on request (between denoising steps or decoded frames); nothing was written."""

    exit_code = 130

"""vidrt: run Wan2.1 / Wan2.2 video models through compiled engines, without torch.

    from vidrt import Pipeline
    pipe = Pipeline.load("engines/wan2.1-t2v-1.3b")     # or Pipeline.load(): the bundled tiny model
    result = pipe("a cat surfing a wave at sunset", num_frames=81, seed=7)
    result.frames                                        # uint8 [F, H, W, 3]
    result.save("cat.mp4")

The rooms (README "Development"): the pipeline and its stages here at the top (pipeline, request,
schedulers, text, vae_decode, video, stats, errors); vidrt.package (the model-package contract);
vidrt.backends (ONNX Runtime, TensorRT, the GPU memory plan, doctor); vidrt.service (jobs, batch,
serve); vidrt.cli (the `vidrt` command). vidrt.export (torch) turns checkpoints into packages.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if _os.path.basename(getattr(_sys.modules.get("__main__"), "__file__", None) or "") == "vidrt":
    # The `vidrt` console script: a Ctrl-C (or SIGTERM) from here until vidrt.cli.main installs its own
    # handlers (imports: ~20 ms) exits 130 (143) with one line, not Python's KeyboardInterrupt traceback.
    # Nothing has been opened or written yet, so there is nothing to clean up. `_signal` (C) is what
    # `signal` wraps: importing it costs nothing, `signal` itself would pull in enum.
    import _signal

    def _exit_on_signal(signum: int, frame: object) -> None:
        interrupted = signum == _signal.SIGINT
        _os.write(2, b"interrupted\n" if interrupted else b"terminated\n")
        _os._exit(130 if interrupted else 143)

    _signal.signal(_signal.SIGINT, _exit_on_signal)
    _signal.signal(_signal.SIGTERM, _exit_on_signal)

from typing import TYPE_CHECKING, Any  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Pipeline", "Request", "Result", "Settings", "VidrtError", "__version__"]

if TYPE_CHECKING:
    from vidrt.errors import VidrtError
    from vidrt.pipeline import Pipeline, Result
    from vidrt.request import Request, Settings

# Imported on first use (PEP 562), so `vidrt --help` and `import vidrt.cli` stay light.
_LAZY = {"Pipeline": "vidrt.pipeline", "Result": "vidrt.pipeline", "Request": "vidrt.request",
         "Settings": "vidrt.request", "VidrtError": "vidrt.errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vidrt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""vidrt.cli: the `vidrt` command line, thin commands over the other rooms.

    app.py    the click group, `run`/`info`/`export`/`bench`, one-line errors and exit codes, signals
    run.py    `vidrt run`: flags -> vidrt.Request -> vidrt.Pipeline -> the video writer
    trt.py    `vidrt build`, `vidrt plan`, `vidrt doctor` (vidrt.backends, vidrt.export.build_engines)
    fleet.py  `vidrt batch`, `vidrt serve` (vidrt.service)

Nothing outside this folder imports it (tests/test_layering.py).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """The console script `vidrt` (pyproject [project.scripts])."""
    from vidrt.cli.app import main as app_main

    app_main(argv)

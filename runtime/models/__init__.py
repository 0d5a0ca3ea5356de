"""Model packages shipped inside the vidrt wheel (package data)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_NAME = "tiny-shapes"


def default_package() -> Path | None:
    """The bundled default model package, or None when this build ships none."""
    path = Path(__file__).parent / DEFAULT_NAME
    return path if (path / "manifest.json").is_file() else None

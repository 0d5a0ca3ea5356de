"""vidrt: run Wan2.1 / Wan2.2 video models through compiled engines, without torch."""

__version__ = "0.1.0"

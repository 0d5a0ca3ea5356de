"""Prompt embeddings cached on disk, so a repeated prompt costs no text-encoder run (and, on a small
card where umT5 runs on the CPU, none of its ~10 s either).

    cache = EmbeddingCache(Path("~/.cache/vidrt/embeddings").expanduser(), package_key(package, manifest))
    context = cache.get(prompts)          # float32 [n, text_len, d_model] or None
    cache.put(prompts, context)

Key: sha256 of the package's text encoder and tokenizer (their artifact hashes, so a re-exported
encoder never reads stale rows), the text length, and the exact prompts (after cleaning, in order:
prompt, negative prompt). One .npy per key, written to a temp name and renamed (a killed run leaves
no half file); an unreadable entry is a miss.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from vidrt.package import contracts as C
from vidrt.package.manifest import Manifest


def package_key(manifest: Manifest) -> str:
    te = manifest.components[C.TEXT_ENCODER].artifact
    return f"{te.sha256}:{te.data_sha256 or ''}:{manifest.tokenizer.sha256}:{manifest.model.text.text_len}"


class EmbeddingCache:
    def __init__(self, folder: Path | str, key: str) -> None:
        self.folder = Path(folder)
        self.key = key
        self.hits = 0

    def _path(self, prompts: list[str]) -> Path:
        digest = hashlib.sha256("\0".join([self.key, *prompts]).encode("utf-8")).hexdigest()
        return self.folder / f"{digest}.npy"

    def get(self, prompts: list[str]) -> np.ndarray | None:
        path = self._path(prompts)
        try:
            out: np.ndarray = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if out.ndim != 3 or out.shape[0] != len(prompts) or out.dtype != np.float32:
            return None
        self.hits += 1
        return out

    def put(self, prompts: list[str], context: np.ndarray) -> None:
        path = self._path(prompts)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(context, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written is only a slower run


__all__ = ["EmbeddingCache", "package_key"]

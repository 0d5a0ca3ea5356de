"""manifest.json of a model package: read, validate, write.

A package is one folder (DESIGN.md §2). The manifest names every artifact with its sha256, the
model spec (architecture, latent statistics, sampling defaults) and each component's I/O
contract. The runtime trusts nothing that the manifest does not vouch for.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vidrt.contracts import Contract
from vidrt.errors import PackageError
from vidrt.registry import ModelSpec, from_dict, to_dict

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A file of the package. `data_file` is the ONNX external-data file, if the graph has one."""

    file: str
    sha256: str
    size_bytes: int
    data_file: str | None = None
    data_sha256: str | None = None
    data_size_bytes: int | None = None

    def files(self) -> list[tuple[str, str, int]]:
        out = [(self.file, self.sha256, self.size_bytes)]
        if self.data_file is not None:
            assert self.data_sha256 is not None and self.data_size_bytes is not None
            out.append((self.data_file, self.data_sha256, self.data_size_bytes))
        return out


@dataclass(frozen=True)
class Component:
    """One exported graph (ONNX) and its contract."""

    name: str
    artifact: Artifact
    contract: Contract
    precision: str  # "fp32" | "fp16" | "bf16" | "fp8"
    opset: int


@dataclass(frozen=True)
class Engine:
    """A TensorRT plan built from a component for one GPU and TensorRT version."""

    component: str
    artifact: Artifact
    precision: str
    tensorrt_version: str
    compute_capability: str  # "8.9"
    profiles: tuple[tuple[int, int, int], ...] = ()  # (width, height, frames) buckets


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    model: ModelSpec
    tokenizer: Artifact
    components: dict[str, Component]
    vidrt_version: str = ""
    export_inputs: dict[str, str] = field(default_factory=dict)  # stage -> fingerprint of its inputs
    vocabulary: tuple[str, ...] = ()  # known prompt words, for small closed-vocabulary models
    engines: tuple[Engine, ...] = ()


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def make_artifact(package: Path, file: str, data_file: str | None = None) -> Artifact:
    """Hash a file (and its external-data file) that already sits in the package folder."""
    p = package / file
    art = Artifact(file=file, sha256=sha256_file(p), size_bytes=p.stat().st_size)
    if data_file is not None and (package / data_file).exists():
        d = package / data_file
        art = Artifact(file, art.sha256, art.size_bytes, data_file, sha256_file(d), d.stat().st_size)
    return art


def write_manifest(package: Path, manifest: Manifest) -> None:
    """Atomic write: a reader never sees a half-written manifest."""
    tmp = package / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(to_dict(manifest), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, package / MANIFEST_NAME)


def _inside(package: Path, name: str) -> Path:
    """Resolve an artifact name, refusing anything that escapes the package folder (.., abs, symlinks)."""
    root = package.resolve()
    p = (package / name).resolve()
    if Path(name).is_absolute() or root not in p.parents:
        raise PackageError(f"{package}: artifact {name!r} points outside the package folder; re-export the package")
    return p


def load_manifest(package: Path | str, verify: bool = True) -> Manifest:
    """Read and validate `package/manifest.json`. With verify, check each artifact's size and sha256."""
    package = Path(package)
    path = package / MANIFEST_NAME
    if not package.is_dir():
        raise PackageError(f"model package {package} does not exist; export one with `vidrt export --model DIR`")
    if not path.is_file():
        raise PackageError(f"{package} has no {MANIFEST_NAME}: not a model package (export one with `vidrt export`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); re-export the package") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        raise PackageError(f"{path} has schema version {found!r}, this vidrt reads {SCHEMA_VERSION}; "
                           f"re-export with this version (`vidrt export`)")
    try:
        manifest = from_dict(Manifest, raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise PackageError(f"{path} is malformed ({exc}); re-export the package") from None
    if verify:
        verify_artifacts(package, manifest)
    return manifest


def all_artifacts(manifest: Manifest) -> list[Artifact]:
    return [manifest.tokenizer] + [c.artifact for c in manifest.components.values()] + \
        [e.artifact for e in manifest.engines]


def verify_artifacts(package: Path, manifest: Manifest) -> None:
    for art in all_artifacts(manifest):
        for name, digest, size in art.files():
            p = _inside(package, name)
            if not p.is_file():
                raise PackageError(f"{package}: {name} is missing; re-export the package (`vidrt export`)")
            if p.stat().st_size != size:
                raise PackageError(f"{package}: {name} has {p.stat().st_size} bytes, the manifest says {size} "
                                   f"(truncated or replaced); re-export the package")
            if sha256_file(p) != digest:
                raise PackageError(f"{package}: {name} does not match its sha256 in the manifest (modified or "
                                   f"corrupt); re-export the package")


def artifact_path(package: Path | str, name: str) -> Path:
    return _inside(Path(package), name)

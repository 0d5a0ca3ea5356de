"""Prepare `build/typings/` for mypy (see typings/README.md). Run: python tests/typing_prep.py

1. The installed `tensorrt-stubs` (site-packages/tensorrt/*.pyi, tensorrt_bindings/*.pyi), copied
   with their syntax errors repaired: parameters named `in` (a keyword) become `in_`, and a
   parameter without a default after one with a default gets `= ...`. Without `py.typed` (which the
   stubs lack) mypy would not read them from site-packages anyway.
2. `vidrt/`: a tree of symlinks that mirrors `[tool.setuptools] package-dir` of pyproject.toml, so
   mypy finds `vidrt.*` (the editable install resolves it through an import hook mypy cannot run).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "typings"
PACKAGE_DIR = {"vidrt": "runtime", "vidrt.export": "export"}


def _package_dir() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return PACKAGE_DIR
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data.get("tool", {}).get("setuptools", {}).get("package-dir", PACKAGE_DIR))


_IN_PARAM = re.compile(r"([(,]\s*)in(\s*:)")


def _split_params(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _fix_defaults(line: str) -> str:
    m = re.match(r"(\s*def \w+\()(.*)(\)\s*->.*)$", line)
    if not m:
        return line
    params = _split_params(m.group(2))
    seen_default, fixed = False, []
    for p in params:
        name = p.strip()
        if "=" in name:
            seen_default = True
        elif seen_default and not name.startswith("*") and name != "/":
            p = p + " = ..."
        fixed.append(p)
    return m.group(1) + ",".join(fixed) + m.group(3)


def repair_stub(text: str, name: str) -> str:
    lines = [_IN_PARAM.sub(r"\1in_\2", ln) if ln.lstrip().startswith("def ") else ln for ln in text.splitlines()]
    for _ in range(200):
        try:
            ast.parse("\n".join(lines), filename=name)
            return "\n".join(lines) + "\n"
        except SyntaxError as exc:
            i = (exc.lineno or 1) - 1
            new = _fix_defaults(lines[i])
            if new == lines[i]:
                raise RuntimeError(f"{name}:{i + 1}: cannot repair: {exc.msg}: {lines[i].strip()}") from None
            lines[i] = new
    raise RuntimeError(f"{name}: too many syntax errors")


def _stub_dirs() -> list[Path]:
    found = []
    for mod in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "__init__.pyi").is_file():
                found.append(Path(loc))
                break
    return found


def prepare(out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dirs = _stub_dirs()
    if len(dirs) < 2:
        raise SystemExit("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs "
                         "(its dependency `tensorrt` cannot be installed from PyPI)")
    for src in dirs:
        dst = out / src.name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir()
        for f in src.glob("*.pyi"):
            (dst / f.name).write_text(repair_stub(f.read_text(encoding="utf-8"), f.name), encoding="utf-8")
    # vidrt/ mirror: a real directory per package, a symlink per module file
    tree = out / "vidrt"
    if tree.exists():
        shutil.rmtree(tree)
    for pkg, rel in sorted(_package_dir().items()):
        root = ROOT / rel
        for src in [root, *sorted(d for d in root.rglob("*") if (d / "__init__.py").is_file())]:
            dst = out.joinpath(*pkg.split("."), *src.relative_to(root).parts)  # subpackages follow their parent
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.suffix in (".py", ".pyi") or f.name == "py.typed":
                    link = dst / f.name
                    if not link.exists():
                        os.symlink(f, link)
    return out


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))

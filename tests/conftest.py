import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# vidrt's remembered sha256 checks (vidrt.package.verified) go to a per-session folder, not ~/.cache
os.environ.setdefault("VIDRT_CACHE_DIR", tempfile.mkdtemp(prefix="vidrt-test-cache-"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory):
    """tiny.DiffusersTiny (the torch modules and the folder) of a tiny random-weight Wan2.1 T2V checkpoint
    (diffusers layout), written once per test session. Never modify its modules (deep-copy them first)."""
    from tiny import write_diffusers_checkpoint

    return write_diffusers_checkpoint(tmp_path_factory.mktemp("shared-ckpt-t2v"), "t2v")


@pytest.fixture(scope="session")
def tiny_t2v_checkpoint(tiny_t2v):
    """The folder of that checkpoint."""
    return tiny_t2v.root


@pytest.fixture(scope="session")
def tiny_t2v_package(tiny_t2v_checkpoint, tmp_path_factory):
    """That checkpoint exported once per session (about a minute on 2 cores), shared by test_export,
    test_pipeline, test_lora, test_caching, test_errors...: never modify it (copy it to tmp_path first)."""
    from tiny import TINY_VARIANT
    from vidrt.export.package import export_package

    out = tmp_path_factory.mktemp("shared-package-t2v") / "package"
    return export_package(tiny_t2v_checkpoint, out, variant=TINY_VARIANT["t2v"], progress=False)


@pytest.fixture(scope="session")
def tiny_ti2v_export(tmp_path_factory):
    """(DiffusersTiny, package, export seconds) of the tiny Wan2.2 TI2V-5B kind (48-ch DiT, Wan2.2 VAE;
    its package has the VAE encoder graphs, for image mode), exported once per session: shared by
    test_export, test_pipeline and test_i2v. Never modify it."""
    import time

    from tiny import TINY_VARIANT, write_diffusers_checkpoint
    from vidrt.export.package import export_package

    root = tmp_path_factory.mktemp("shared-ckpt-ti2v")
    tiny = write_diffusers_checkpoint(root, "ti2v")
    t0 = time.perf_counter()
    package = export_package(root, root.parent / "shared-package-ti2v", variant=TINY_VARIANT["ti2v"], progress=False)
    return tiny, package, time.perf_counter() - t0


@pytest.fixture(scope="session")
def run_package(request):
    """The bundled default model when this build ships one (runtime/models/tiny-shapes/), else the tiny
    random package: for tests that only need some real package to run."""
    from vidrt.models import default_package

    bundled = default_package()
    return bundled if bundled is not None else request.getfixturevalue("tiny_t2v_package")


@pytest.fixture(scope="session")
def baked_package(tmp_path_factory):
    """(package, LoRA file): the bundled model with a small distillation-style LoRA baked into its DiT (what
    `vidrt export --lora distill.safetensors` writes: bake_loras + manifest baked_loras), made once per
    session for the recipes that need the user's own LoRA (lightx2v-4step): test_lora_records (vidrt run,
    Python API), test_scaleout (vidrt batch), test_serve (vidrt serve). Never modify it."""
    import shutil
    from dataclasses import replace

    import numpy as np
    from safetensors.numpy import save_file
    from vidrt.export.package_extras import bake_loras, baked_records
    from vidrt.models import default_package
    from vidrt.package.manifest import load_manifest, write_manifest
    from vidrt.package.recipes import LoraRef

    bundled = default_package()
    if bundled is None:
        pytest.skip("this build ships no bundled model")
    manifest = load_manifest(bundled, verify=False)
    root = tmp_path_factory.mktemp("shared-baked")
    baked = root / "baked"
    shutil.copytree(bundled, baked, ignore=shutil.ignore_patterns(".export.lock"))
    dim, q = manifest.model.dit.dim, "diffusion_model.blocks.0.self_attn.q"  # rank 4 on the first block's q
    distill = root / "distill.safetensors"
    save_file({f"{q}.lora_down.weight": np.full((4, dim), 0.01, np.float32),
               f"{q}.lora_up.weight": np.ones((dim, 4), np.float32)}, str(distill))
    ref = LoraRef(str(distill), 1.0)
    changed = bake_loras(baked, manifest.components, "dit", [ref])
    write_manifest(baked, replace(manifest, components={**manifest.components, **changed},
                                  baked_loras=baked_records([ref], manifest.model.experts)))
    return baked, distill

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

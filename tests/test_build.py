"""The package loads, every op of SPEC section 3 has a schema and a CPU kernel, and the build
reports itself."""
import torch

import dsa_ext


def test_build_info_reports_versions():
    info = dsa_ext.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(info["ops"]) == set(dsa_ext.OP_NAMES)
    if info["with_cuda"]:
        assert info["cuda_archs"]


def test_every_op_has_schema_and_cpu_kernel():
    for name in dsa_ext.OP_NAMES:
        assert hasattr(torch.ops.dsa, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa::{name}", "CPU"), name


def test_every_op_has_fake_kernel():
    for name in dsa_ext.OP_NAMES:
        op = getattr(torch.ops.dsa, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or \
            torch._library.simple_registry.singleton.find(op.name()).fake_impl.kernel is not None, name


def test_every_op_has_cuda_kernel_in_a_cuda_build():
    info = dsa_ext.build_info()
    if not info["with_cuda"]:
        import pytest
        pytest.skip("built without CUDA")
    assert set(info["cuda_ops"]) == set(dsa_ext.OP_NAMES)


def test_source_tree_without_a_build_says_so(tmp_path):
    """Importing a source tree that has no compiled module (e.g. from the checkout after a
    non-editable install) explains itself instead of Python's 'partially initialized module ...
    circular import'."""
    import os
    import shutil
    import subprocess
    import sys
    src = os.path.dirname(os.path.abspath(dsa_ext.__file__))
    # under another name: an editable install's import hook would otherwise find the real tree
    shutil.copytree(src, tmp_path / "dsa_ext_copy", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import dsa_ext_copy"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert "compiled module (_C*.so) is not in" in r.stderr and "tools/dev_build.sh" in r.stderr
    assert "circular import" not in r.stderr.splitlines()[-1]

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


def _import_with_fake_torch(patch, tmp_path, env_extra=None):
    """Import dsa_ext in a fresh interpreter after `patch` changed what torch reports, the way a
    wheel installed next to another torch sees it. The check runs before _C loads, so faking the
    version is enough to exercise it (a real second torch install is not needed)."""
    import os
    import subprocess
    import sys
    code = f"import torch\n{patch}\nimport dsa_ext\nprint('loaded')"
    env = {k: v for k, v in os.environ.items() if k != "DSA_SKIP_TORCH_CHECK"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)


def _built():
    import pytest
    try:
        from dsa_ext import _build_info
    except ImportError:
        pytest.skip("this build predates dsa_ext/_build_info.py")
    return _build_info


def test_build_records_the_torch_it_was_compiled_against():
    built = _built()
    assert built.TORCH_VERSION == dsa_ext.build_info()["torch_version"] == torch.__version__
    assert built.WITH_CUDA == dsa_ext.build_info()["with_cuda"]
    assert dsa_ext.build_info()["torch_requirement"] == f"torch=={torch.__version__.split('+')[0]}"


def test_setup_pins_the_release_it_builds_against():
    """The wheel's metadata requires the release it is compiled against (setup.py's rule,
    read out of setup.py: importing it would start a build)."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ns = {}
    exec(_extract_function(open(os.path.join(root, "setup.py")).read(), "torch_requirement"), ns)
    assert ns["torch_requirement"]("2.14.1+cu130") == "torch==2.14.1"
    assert ns["torch_requirement"]("2.13.0") == "torch==2.13.0"


def _extract_function(src, name):
    lines = src.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"def {name}("))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_another_torch_release_is_refused_in_plain_words(tmp_path):
    built = _built()
    r = _import_with_fake_torch("torch.__version__ = '2.13.0+cpu'", tmp_path)
    assert r.returncode != 0 and "loaded" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dsa_ext was compiled against torch " + built.TORCH_VERSION), last
    assert "torch 2.13.0+cpu is running" in last
    assert f"pip install torch=={built.TORCH_VERSION.split('+')[0]}" in last
    assert "undefined symbol" in last and "DSA_SKIP_TORCH_CHECK" in last


def test_same_release_other_local_label_loads(tmp_path):
    """2.14.1+cu130 vs 2.14.1: the same release, the check lets it through (and _C loads)."""
    built = _built()
    r = _import_with_fake_torch(f"torch.__version__ = '{built.TORCH_VERSION.split('+')[0]}'", tmp_path)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr


def test_cuda_build_under_cpu_only_torch_is_refused(tmp_path):
    import pytest
    built = _built()
    if not built.WITH_CUDA:
        pytest.skip("a CPU-only build loads under either torch build")
    r = _import_with_fake_torch("torch.version.cuda = None", tmp_path)
    assert r.returncode != 0
    assert "is a CPU-only build" in r.stderr.strip().splitlines()[-1]
    r = _import_with_fake_torch("torch.version.cuda = '12.8'", tmp_path)
    assert r.returncode != 0
    assert "built for CUDA 12.8" in r.stderr.strip().splitlines()[-1]


def test_skip_switch_bypasses_the_check(tmp_path):
    _built()
    r = _import_with_fake_torch("torch.__version__ = '2.13.0'", tmp_path, {"DSA_SKIP_TORCH_CHECK": "1"})
    # the real torch is the built one, so with the check off the module loads
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr


def test_images_in_the_library_are_the_arch_list():
    """TORCH_CUDA_ARCH_LIST's meaning (torch's): "9.0a" is a cubin only, "10.0+PTX" adds PTX.
    CMake's plain "90a" would embed compute_90a PTX as well, which env.loaded_image ignores."""
    import os
    import re
    import shutil
    import subprocess
    import pytest
    from dsa_ext.env import parse_archs
    info = dsa_ext.build_info()
    if not info["with_cuda"]:
        pytest.skip("built without CUDA")
    cuobjdump = shutil.which("cuobjdump")
    try:
        import triton
        c = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        cuobjdump = c if os.access(c, os.X_OK) else cuobjdump
    except ImportError:
        pass
    if cuobjdump is None:
        pytest.skip("no cuobjdump")
    so = dsa_ext._C.__file__
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True).stdout
    cubins, ptx_levels = parse_archs(info["cuda_archs"])
    assert sorted(set(re.findall(r"\.sm_(\d+[af]?)\.cubin", elf))) == sorted(set(cubins))
    assert sorted({int(re.sub(r"[af]$", "", p)) for p in re.findall(r"\.sm_(\d+[af]?)\.ptx", ptx)}) == \
        sorted(set(ptx_levels))
